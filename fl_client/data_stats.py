"""Cheap statistics of a client's data, reported every round so the server can spot drift.

``shard_stats`` reads a seeded sample of a shard's images (grayscale, downscaled) and
their YOLO labels, and returns normalised histograms: pixel brightness, per-image
contrast, class mix and box sizes. ``to_metrics``/``from_metrics`` carry them in a
Flower ``MetricRecord`` as ``ds-*`` entries; ``fl_server.data_drift`` scores them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from ultralytics.data.utils import IMG_FORMATS, img2label_paths

PREFIX = "ds-"
HISTOGRAMS: tuple[str, ...] = ("brightness", "contrast", "classes", "box_size")
COUNTS: tuple[str, ...] = ("images", "unreadable")
BRIGHTNESS_BINS = 16  # pixel gray levels 0..255, 16 levels a bin
CONTRAST_BINS = 8  # per-image gray std over its whole range 0..128, 16 a bin
BOX_BINS = 8  # sqrt(w*h) (normalised) from 2**-8 to 1, a bin per factor of 2
_MAX_SIDE = 128  # larger images are downscaled before measuring


def shard_stats(
    data_yaml: Path, *, sample: int, seed: int, nc: int, split: str = "train"
) -> dict[str, Any]:
    """Statistics of ``sample`` images (picked with ``seed``) of a YOLO dataset's ``split``.

    Returns normalised histograms (each sums to 1, or is all zeros when empty):
    ``brightness`` (16 bins, pixel gray levels, every image weighted equally),
    ``contrast`` (8 bins of per-image gray std), ``classes`` (nc + 1 bins: boxes per
    class, then one count per image with no boxes) and ``box_size`` (8 log-spaced
    bins of sqrt(w*h)); plus the counts ``images`` (read) and ``unreadable`` (images
    that could not be decoded and label lines that could not be parsed, all skipped).
    """
    images = _split_images(Path(data_yaml), split)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(images), size=min(sample, len(images)), replace=False)
    brightness = np.zeros(BRIGHTNESS_BINS)
    stds, sizes = [], []
    classes = np.zeros(nc + 1)
    read = unreadable = 0
    for i in sorted(picked):
        gray = _read_gray(images[i])
        if gray is None:
            unreadable += 1
            continue
        read += 1
        brightness += np.bincount(gray.ravel() >> 4, minlength=BRIGHTNESS_BINS) / gray.size
        stds.append(float(gray.std()))
        boxes, bad = _read_labels(Path(img2label_paths([str(images[i])])[0]), nc)
        unreadable += bad
        if boxes:
            classes += np.bincount([c for c, _ in boxes], minlength=nc + 1)
            sizes.extend(s for _, s in boxes)
        else:
            classes[nc] += 1  # a background image
    return {
        "brightness": _normalise(brightness),
        "contrast": _normalise(_soft_hist(stds, 0.0, 128.0, CONTRAST_BINS)),
        "classes": _normalise(classes),
        "box_size": _normalise(_soft_hist(np.log2(sizes), -8.0, 0.0, BOX_BINS)),
        "images": read,
        "unreadable": unreadable,
    }


def to_metrics(stats: Mapping[str, Any]) -> dict[str, list[float] | int]:
    """``ds-*`` entries for a Flower MetricRecord (lists of floats and ints)."""
    out: dict[str, list[float] | int] = {
        PREFIX + k: [float(v) for v in stats[k]] for k in HISTOGRAMS
    }
    out.update({PREFIX + k: int(stats[k]) for k in COUNTS})
    return out


def from_metrics(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The statistics carried in ``metrics`` (inverse of ``to_metrics``); None if absent."""
    if not all(PREFIX + k in metrics for k in HISTOGRAMS):
        return None
    stats: dict[str, Any] = {k: np.asarray(metrics[PREFIX + k], float) for k in HISTOGRAMS}
    stats.update({k: int(metrics.get(PREFIX + k, 0)) for k in COUNTS})
    return stats


def _split_images(data_yaml: Path, split: str) -> list[Path]:
    """Image paths of ``split`` in a data.yaml: a folder, a .txt list, an image, or a list."""
    config = yaml.safe_load(data_yaml.read_text())
    root = Path(config.get("path") or data_yaml.parent).expanduser()
    root = root if root.is_absolute() else data_yaml.parent / root
    entries = config.get(split) or []
    images: list[Path] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        path = root / str(entry)
        if path.is_dir():
            images += (p for p in path.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
        elif path.suffix == ".txt":  # one image per line, relative to the list's folder
            lines = filter(None, map(str.strip, path.read_text().splitlines()))
            images += (path.parent / line for line in lines)
        else:
            images.append(path)
    return sorted(images)


def _read_gray(path: Path) -> np.ndarray | None:
    """The image in grayscale, at most ``_MAX_SIDE`` pixels a side; None if unreadable."""
    try:
        gray = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE)
    except (OSError, ValueError, cv2.error):
        return None
    if gray is None or gray.size == 0:
        return None
    scale = _MAX_SIDE / max(gray.shape)
    if scale < 1:
        size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    return gray


def _read_labels(path: Path, nc: int) -> tuple[list[tuple[int, float]], int]:
    """(class, sqrt(w*h)) of every valid line of a YOLO label file, and the bad-line count."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return [], 0  # no label file: a background image
    except (OSError, UnicodeDecodeError):
        return [], 1
    boxes, bad = [], 0
    for line in filter(str.strip, lines):
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            values = []
        if len(values) == 5:
            cls, _, _, w, h = values
        elif len(values) >= 7 and len(values) % 2:  # a segment polygon: use its box
            cls, xs, ys = values[0], values[1::2], values[2::2]
            w, h = max(xs) - min(xs), max(ys) - min(ys)
        else:
            bad += 1
            continue
        if not (0 <= cls < nc and cls == int(cls) and w > 0 and h > 0):  # NaN fails too
            bad += 1
            continue
        boxes.append((int(cls), float(np.sqrt(w * h))))
    return boxes, bad


def _soft_hist(values: list[float] | np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Histogram where each value splits its weight between the two nearest bin centres.

    Less sampling noise than hard bins for a few dozen values (a value near an edge no
    longer flips between bins from one sample to the next); out-of-range values clip.
    """
    x = np.clip((np.asarray(values, float) - lo) / (hi - lo) * bins - 0.5, 0, bins - 1)
    low = np.floor(x).astype(int)
    high = np.minimum(low + 1, bins - 1)
    return np.bincount(low, 1 - (x - low), bins) + np.bincount(high, x - low, bins)


def _normalise(hist: np.ndarray) -> np.ndarray:
    hist = np.asarray(hist, float)
    total = hist.sum()
    return hist / total if total > 0 else hist
