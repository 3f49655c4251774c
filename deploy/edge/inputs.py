"""What a detector is fed at the edge, computed the way Ultralytics' predictor does it.

One function serves calibration, the parity gate and the latency benchmark, so the three see
the same tensors: Ultralytics' ``LetterBox`` (``fl_client.ultralytics_adapter.letterbox``) to a
square ``imgsz`` (``auto=False``: the exported graph has a fixed input shape; grey padding 114),
BGR → RGB, HWC → CHW, float32 in 0..1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from deploy.edge import EdgeError
from fl_client.ultralytics_adapter import letterbox

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
PREPROCESS = {  # what model.json tells an edge runtime to do before the model
    "resize": "letterbox",
    "letterbox_pad_value": 114,
    "letterbox_center": True,
    "color": "RGB",
    "layout": "NCHW",
    "dtype": "float32",
    "scale": 1 / 255,
}


def image_files(folder: Path) -> list[Path]:
    """The images directly in ``folder`` (or its ``images/`` subfolder), sorted by name."""
    folder = Path(folder)
    if (folder / "images").is_dir():
        folder = folder / "images"
    if not folder.is_dir():
        raise EdgeError(f"images: {folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load(path: Path, imgsz: int) -> np.ndarray:
    """One image as a (1, 3, imgsz, imgsz) float32 array; a file that is no image is named."""
    import cv2

    im = cv2.imread(str(path))
    if im is None:
        raise EdgeError(f"image {path}: cannot be read as an image")
    im = letterbox(im, imgsz)
    x = im[..., ::-1].transpose(2, 0, 1)  # BGR HWC → RGB CHW
    return np.ascontiguousarray(x, dtype=np.float32)[None] / 255.0


def batches(paths: Sequence[Path], imgsz: int) -> Iterator[np.ndarray]:
    for p in paths:
        yield load(p, imgsz)


def spread(paths: Sequence[Path], n: int) -> list[Path]:
    """``n`` of ``paths`` spread evenly over the list (all of them when there are fewer)."""
    if n >= len(paths):
        return list(paths)
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in idx]
