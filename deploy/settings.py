"""Settings of the deploy commands (``export``, ``bench``, ``deploy aws``): a yaml of defaults in
``configs/`` plus ``key=value`` overrides; an unknown key or a malformed override is one line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from deploy import DeployError


def _flat(cfg: DictConfig, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in cfg.items():
        keys.add(f"{prefix}{k}")
        if isinstance(v, DictConfig):
            keys |= _flat(v, f"{prefix}{k}.")
    return keys


def load(
    defaults: Path, overrides: Sequence[str], label: str, error: type[DeployError] = DeployError
) -> DictConfig:
    """``defaults`` merged with ``overrides``; ``error(one line)`` names a bad override."""
    cfg = OmegaConf.load(defaults)
    known = _flat(cfg)
    for o in overrides:
        key, sep, _ = o.partition("=")
        if not sep:
            raise error(f"{label}: {o!r} is not key=value")
        if key not in known:
            raise error(f"{label}: unknown setting {key!r} (see {defaults.relative_to(ROOT)})")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


ROOT = Path(__file__).resolve().parent.parent
