"""Fixtures for the data-layer tests: one synthetic dataset per session, image writers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from fl_server.data import Dataset, generate, load_dataset

SYNTH_DOMAINS = ("day", "night", "fog", "rain")


@pytest.fixture(scope="session")
def synth_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 synthetic 128 px images over four domains (16 each); do not modify."""
    out = tmp_path_factory.mktemp("synth64") / "synth"
    return generate(out, 64, imgsz=128, seed=0, domains=SYNTH_DOMAINS)


@pytest.fixture(scope="session")
def synth_ds(synth_yaml: Path) -> Dataset:
    return load_dataset(synth_yaml)


def jpeg_bytes(size: int = 48, seed: int = 0) -> bytes:
    """A noisy JPEG (noise keeps the entropy-coded data long, so cutting it truncates the scan)."""
    img = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


@pytest.fixture
def write_jpeg() -> Callable[..., Path]:
    """Write a small valid JPEG at a path (parents created) and return the path."""

    def _write(path: Path, size: int = 48, seed: int = 0) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(size, seed))
        return path

    return _write
