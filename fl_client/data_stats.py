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

from fl_client.data import labels
from fl_client.data.formats import label_path_for, read_data_yaml
from fl_client.wire import DATA_STATS_PREFIX as PREFIX  # the metrics' prefix: the contract's

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
    images = read_data_yaml(data_yaml).images(split)
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
        boxes, bad = _read_labels(label_path_for(images[i]), nc)
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
    boxes, bad = [], 0
    try:
        for line in labels.read_lines(path):
            if isinstance(line, labels.LabelLineError) or not line.class_in(nc):
                bad += 1
            elif line.w > 0 and line.h > 0:
                boxes.append((int(line.cls), float(np.sqrt(line.w * line.h))))
            else:
                bad += 1
    except (OSError, UnicodeDecodeError):
        return [], 1
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
