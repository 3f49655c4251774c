"""Shared fixtures: a tiny synthetic dataset generated once per session (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48-image synthetic driving set at 64 px (data.yaml path)."""
    from fl_client.data import generate

    out = tmp_path_factory.mktemp("synth")
    return generate(out, 48, imgsz=64, seed=1, domains=["day", "night"])
