"""Settings of the deploy commands (``export``, ``bench``, ``deploy aws``): a yaml of defaults in
``configs/`` plus ``key=value`` overrides; an unknown key or a malformed override is one line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from deploy import DeployError
from fl_server.config import CONFIG_DIR, compose_settings


def load(
    defaults: Path, overrides: Sequence[str], label: str, error: type[DeployError] = DeployError
) -> DictConfig:
    """``defaults`` with ``overrides``, composed as a run's config is
    (``fl_server.config.compose_settings``); ``error(one line)`` names a bad override."""
    name = defaults.relative_to(CONFIG_DIR).with_suffix("").as_posix()
    return compose_settings(name, overrides, label, error)


ROOT = Path(__file__).resolve().parent.parent
