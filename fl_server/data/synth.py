"""Synthetic driving-like detection scenes, written as an Ultralytics YOLO dataset.

This is the built-in "fleet": a dataset that needs no download, is deterministic by
seed, and is varied enough (weather/light domains, urban/highway class mixes, scale
by perspective, occlusion, unlabelled clutter) for federated experiments to mean
something, while staying easy enough for a tiny YOLO to learn in a few epochs.

Every image is drawn from its own child seed, so image ``i`` is the same whatever
``num_images`` is, and the scene geometry of image ``i`` does not depend on its
domain (the domain effect draws from a separate stream): the same seed rendered as
``day`` and as ``night`` shows the same street.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from fl_client.data.errors import DataError
from fl_server.data.paint import PAINTERS, Box, color, uniform

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("car", "pedestrian", "cyclist", "traffic_sign")
DOMAINS: tuple[str, ...] = ("day", "dusk", "night", "fog", "rain", "blur")
CLASS_MIXES: tuple[str, ...] = ("urban", "highway")

# Class probabilities per object (order of CLASSES) and objects per image (inclusive).
_MIX_WEIGHTS = {"urban": (0.34, 0.30, 0.16, 0.20), "highway": (0.80, 0.03, 0.02, 0.15)}
_MIX_COUNTS = {"urban": (3, 8), "highway": (2, 6)}
_MIX_CDF = {mix: np.cumsum(w)[:-1] for mix, w in _MIX_WEIGHTS.items()}

# Per class: box height at the bottom of the image (fraction of imgsz) and w/h range.
_CLASS_HEIGHT = (0.28, 0.42, 0.40, 0.45)
_CLASS_ASPECT = ((1.3, 2.2), (0.32, 0.42), (0.85, 1.15), (0.30, 0.42))
_MIN_BOX_AT_128 = 6.0  # smallest box side in pixels at 128 px; scaled with imgsz
_MAX_HIDDEN = 0.7  # objects hidden more than this by nearer ones are left out
_JPEG_QUALITY = 90
_LOG_EVERY = 1000


@dataclass(frozen=True)
class _Layout:
    """Where the road is: horizon row, vanishing point and road half-width at the bottom."""

    size: int
    horizon: int
    vx: float
    road_half: float

    def depth(self, y: float) -> float:
        """Perspective depth: 0 at the horizon, 1 at the bottom row."""
        return (y - self.horizon) / (self.size - self.horizon)


@dataclass(frozen=True)
class _Object:
    """One object in a scene: class id and integer box (x1, y1, x2, y2), exclusive end."""

    cls: int
    box: Box

    @property
    def bottom(self) -> int:
        return self.box[3]


# ---------------------------------------------------------------------------- public


def generate(
    out_dir: Path,
    num_images: int,
    imgsz: int = 128,
    seed: int = 0,
    domains: Sequence[str] = ("day",),
    class_mix: str | None = None,
) -> Path:
    """Write a synthetic YOLO dataset to ``out_dir`` and return its ``data.yaml`` path.

    Layout: ``images/*.jpg``, ``labels/*.txt`` (``cls cx cy w h`` normalised),
    ``meta.jsonl`` (domain and class mix of every image) and ``data.yaml``
    (Ultralytics format, train and val both ``images``). Image ``i`` gets domain
    ``domains[i % len(domains)]``; ``class_mix=None`` alternates urban/highway.
    Output is byte-identical for the same arguments.
    """
    out_dir = Path(out_dir)
    _validate_args(num_images, imgsz, seed, domains, class_mix)
    images_dir, labels_dir = _prepare_out_dir(out_dir)
    log.info(
        "generating %d synthetic images (%d px, seed %d) in %s", num_images, imgsz, seed, out_dir
    )
    meta_lines = []
    for i in range(num_images):
        domain = domains[i % len(domains)]
        mix = class_mix or CLASS_MIXES[i % len(CLASS_MIXES)]
        image, labels = render_image(i, imgsz, seed, domain, mix)
        name = f"{i:06d}"
        _write_jpeg(images_dir / f"{name}.jpg", image)
        (labels_dir / f"{name}.txt").write_text("".join(f"{line}\n" for line in labels))
        meta_lines.append(
            json.dumps({"image": f"images/{name}.jpg", "domain": domain, "class_mix": mix})
        )
        if (i + 1) % _LOG_EVERY == 0:
            log.info("generated %d/%d images", i + 1, num_images)
    (out_dir / "meta.jsonl").write_text("".join(f"{line}\n" for line in meta_lines))
    return _write_data_yaml(out_dir)


def render_image(
    index: int, imgsz: int, seed: int, domain: str, class_mix: str
) -> tuple[np.ndarray, list[str]]:
    """Render image ``index`` of a seed as a BGR array plus its YOLO label lines.

    Exposed so callers (benchmarks, tests) can draw scenes without touching disk.
    """
    scene_rng = np.random.default_rng([seed, index, 0])
    effect_rng = np.random.default_rng([seed, index, 1])
    layout = _random_layout(scene_rng, imgsz)
    img = _draw_background(scene_rng, layout)
    _draw_clutter(scene_rng, img, layout)
    objects = _visible_objects(_place_objects(scene_rng, layout, class_mix), imgsz)
    for obj in objects:  # far to near, so nearer objects occlude farther ones
        PAINTERS[obj.cls](img, obj.box, scene_rng)
    _add_noise(scene_rng, img, seed, amplitude=4)  # sensor noise: flat areas are never flat
    img = _DOMAIN_EFFECTS[domain](img, effect_rng, layout, objects)
    if domain == "rain":
        _add_noise(effect_rng, img, seed, amplitude=14)
    return img, [_label_line(obj, imgsz) for obj in objects]


# ---------------------------------------------------------------------- file output


def _validate_args(
    num_images: int, imgsz: int, seed: int, domains: Sequence[str], class_mix: str | None
) -> None:
    """Reject bad arguments with one line naming the parameter."""
    if num_images < 1:
        raise DataError(f"synth: num_images must be >= 1, got {num_images}")
    if imgsz < 32:
        raise DataError(f"synth: imgsz must be >= 32 pixels, got {imgsz}")
    if seed < 0:
        raise DataError(f"synth: seed must be >= 0, got {seed}")
    if isinstance(domains, str) or not domains:
        raise DataError(f"synth: domains must be a non-empty list of {', '.join(DOMAINS)}")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise DataError(
            f"synth: unknown domain(s) {unknown}; expected some of {', '.join(DOMAINS)}"
        )
    if class_mix is not None and class_mix not in CLASS_MIXES:
        raise DataError(
            f"synth: unknown class_mix {class_mix!r}; "
            f"expected one of {', '.join(CLASS_MIXES)} or none"
        )


def _prepare_out_dir(out_dir: Path) -> tuple[Path, Path]:
    """Create images/ and labels/, replacing a previous synthetic dataset but never user data."""
    images_dir, labels_dir = out_dir / "images", out_dir / "labels"
    meta = out_dir / "meta.jsonl"
    if meta.is_file():
        shutil.rmtree(images_dir, ignore_errors=True)
        shutil.rmtree(labels_dir, ignore_errors=True)
        (out_dir / "labels.cache").unlink(missing_ok=True)  # Ultralytics' label cache
    elif any(d.is_dir() and any(d.iterdir()) for d in (images_dir, labels_dir)):
        raise DataError(
            f"synth: {out_dir} already holds images/labels that are not synthetic; "
            "choose an empty folder"
        )
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    meta.write_text("")  # marks the folder as ours at once, so an interrupted run can be redone
    return images_dir, labels_dir


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:  # pragma: no cover - cv2 only fails here on a broken build
        raise RuntimeError(f"JPEG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def _write_data_yaml(out_dir: Path) -> Path:
    data = {
        "path": str(out_dir.resolve()),
        "train": "images",
        "val": "images",
        "nc": len(CLASSES),
        "names": dict(enumerate(CLASSES)),
    }
    path = out_dir / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _label_line(obj: _Object, size: int) -> str:
    x1, y1, x2, y2 = obj.box
    cx, cy = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size
    return f"{obj.cls} {cx:.6f} {cy:.6f} {(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}"


# ------------------------------------------------------------------------ the scene


def _random_layout(rng: np.random.Generator, size: int) -> _Layout:
    return _Layout(
        size=size,
        horizon=int(size * uniform(rng, 0.33, 0.48)),
        vx=size * uniform(rng, 0.35, 0.65),
        road_half=size * uniform(rng, 0.45, 0.7),
    )


def _draw_background(rng: np.random.Generator, lay: _Layout) -> np.ndarray:
    """Sky gradient, ground, road trapezoid and lane markings."""
    s, h = lay.size, lay.horizon
    img = np.empty((s, s, 3), np.uint8)
    ends = np.array(
        [[color(rng, (225, 180, 120), 20)], [color(rng, (240, 228, 205), 15)]], np.uint8
    )
    img[:h] = cv2.resize(ends, (s, h), interpolation=cv2.INTER_LINEAR)
    img[h:] = color(rng, (95, 135, 110), 25)
    road = np.array(
        [
            [lay.vx - 1, h],
            [lay.vx + 1, h],
            [lay.vx + lay.road_half, s],
            [lay.vx - lay.road_half, s],
        ],
        np.int32,
    )
    cv2.fillConvexPoly(img, road, color(rng, (105, 105, 105), 18))
    _draw_lanes(rng, img, lay)
    return img


def _draw_lanes(rng: np.random.Generator, img: np.ndarray, lay: _Layout) -> None:
    """Solid edge lines and dashed centre lines, all converging on the vanishing point."""
    white = color(rng, (225, 225, 225), 20)
    s, h = lay.size, lay.horizon
    for side in (-0.95, 0.95):
        cv2.line(
            img, (int(lay.vx), h), (int(lay.vx + side * lay.road_half), s), white, max(1, s // 96)
        )
    lanes = (0.0,) if rng.random() < 0.5 else (-0.33, 0.33)
    phase = uniform(rng, 0, 1)
    for lane in lanes:
        for k in range(8):
            t0, t1 = ((k + phase) / 8) ** 2, ((k + phase + 0.45) / 8) ** 2
            p0 = (int(lay.vx + lane * lay.road_half * t0), int(h + t0 * (s - h)))
            p1 = (int(lay.vx + lane * lay.road_half * t1), int(h + t1 * (s - h)))
            cv2.line(img, p0, p1, white, max(1, int(s / 64 * t1)))


def _draw_clutter(rng: np.random.Generator, img: np.ndarray, lay: _Layout) -> None:
    """Buildings, trees and blobs: structure the detector must learn to ignore."""
    for _ in range(rng.integers(0, 7)):
        _draw_building(rng, img, lay)
    for _ in range(rng.integers(0, 5)):
        _draw_tree(rng, img, lay)
    for _ in range(rng.integers(2, 8)):
        centre = (int(rng.integers(0, lay.size)), int(rng.integers(0, lay.size)))
        axes = (int(rng.integers(1, lay.size // 12 + 2)), int(rng.integers(1, lay.size // 20 + 2)))
        angle = float(uniform(rng, 0, 180))
        cv2.ellipse(img, centre, axes, angle, 0, 360, color(rng, (110, 110, 110), 90), -1)


def _draw_building(rng: np.random.Generator, img: np.ndarray, lay: _Layout) -> None:
    s, h = lay.size, lay.horizon
    bw, bh = int(s * uniform(rng, 0.08, 0.25)), int(h * uniform(rng, 0.2, 0.8))
    x1 = int(rng.integers(-bw // 2, s))
    colour = color(rng, (140, 150, 160), 45)
    cv2.rectangle(img, (x1, h - bh), (x1 + bw, h), colour, -1)
    step, pane = max(3, s // 32), max(1, s // 96)
    facade = img[
        h - bh + step // 2 : h - step, max(0, x1 + step // 2) : max(0, x1 + bw - step // 2)
    ]
    window = color(rng, (70, 80, 90), 25)
    for dy in range(pane):
        for dx in range(pane):
            facade[dy::step, dx::step] = window


def _draw_tree(rng: np.random.Generator, img: np.ndarray, lay: _Layout) -> None:
    """Roadside tree: thick trunk and a lumpy green canopy (never a clean disc like a sign)."""
    t = uniform(rng, 0.05, 0.6)
    y = int(lay.horizon + t * (lay.size - lay.horizon))
    side = -1 if rng.random() < 0.5 else 1
    x = int(lay.vx + side * lay.road_half * t * uniform(rng, 1.3, 2.2))
    height = max(4, int(lay.size * 0.5 * t + 6))
    trunk = max(1, height // 10)
    cv2.line(img, (x, y), (x, y - height // 2), color(rng, (40, 70, 100), 15), trunk)
    green = color(rng, (50, 120, 60), 25)
    for _ in range(4):
        dx, dy = ((rng.random(2) - 0.5) * (height // 2)).tolist()
        r = max(2, int(height * uniform(rng, 0.18, 0.3)))
        cv2.circle(img, (x + int(dx), y - int(height * 0.65) + int(dy)), r, green, -1)


def _place_objects(rng: np.random.Generator, lay: _Layout, class_mix: str) -> list[_Object]:
    """Draw object classes, depths and positions; returned far to near."""
    lo, hi = _MIX_COUNTS[class_mix]
    count = lo + int(rng.random() * (hi - lo + 1))
    classes = np.searchsorted(_MIX_CDF[class_mix], rng.random(count), side="right")
    objects = [_place_one(rng, lay, int(c)) for c in classes]
    return sorted(objects, key=lambda o: o.bottom)


def _place_one(rng: np.random.Generator, lay: _Layout, cls: int) -> _Object:
    """Size an object by its depth (perspective) and put it where its class belongs."""
    a_lo, a_hi = _CLASS_ASPECT[cls]
    aspect = uniform(rng, a_lo, a_hi)
    base_h = _CLASS_HEIGHT[cls] * lay.size
    min_px = _MIN_BOX_AT_128 * lay.size / 128
    t_min = min(1.0, min_px / (0.9 * base_h * min(1.0, aspect)))
    t = uniform(rng, t_min, 1.0) ** 0.8
    bottom = min(lay.size, int(round(lay.horizon + t * (lay.size - lay.horizon))))
    h = max(min_px, base_h * lay.depth(bottom) * uniform(rng, 0.9, 1.1))
    w = max(min_px, h * aspect)
    h, w = min(h, bottom), min(w, lay.size)
    cx = lay.vx + _lateral_offset(rng, cls) * lay.road_half * lay.depth(bottom)
    x1 = int(round(np.clip(cx - w / 2, 0, lay.size - w)))
    return _Object(cls, (x1, int(round(bottom - h)), int(round(x1 + w)), bottom))


def _lateral_offset(rng: np.random.Generator, cls: int) -> float:
    """Signed offset from the road centre in road half-widths: cars in lanes, others aside."""
    if cls == 0:
        return uniform(rng, -0.75, 0.75)
    side = -1.0 if rng.random() < 0.5 else 1.0
    if cls == 2:
        return side * uniform(rng, 0.6, 1.05)
    return side * uniform(rng, 1.05, 1.6)


def _visible_objects(objects: list[_Object], size: int) -> list[_Object]:
    """Drop objects hidden more than _MAX_HIDDEN by nearer boxes: neither drawn nor labelled."""
    covered = np.zeros((size, size), bool)
    kept = []
    for obj in reversed(objects):  # near to far
        x1, y1, x2, y2 = obj.box
        area = max(1, (x2 - x1) * (y2 - y1))
        if covered[y1:y2, x1:x2].sum() / area <= _MAX_HIDDEN:
            kept.append(obj)
        covered[y1:y2, x1:x2] = True
    return kept[::-1]


# -------------------------------------------------------------------------- domains


@functools.lru_cache(maxsize=8)
def _noise_bank(seed: int, size: int, amplitude: int) -> np.ndarray:
    """A 2x-sized texture of uniform noise in [0, 2*amplitude], made once per (seed, size).

    Drawing fresh noise for every image dominates generation time; a random crop of a
    shared bank looks the same and keeps each image a function of (seed, index) only.
    """
    rng = np.random.default_rng([seed, size, amplitude, 7])
    return rng.integers(0, 2 * amplitude + 1, size=(2 * size, 2 * size, 3), dtype=np.uint8)


def _add_noise(rng: np.random.Generator, img: np.ndarray, seed: int, amplitude: int) -> None:
    """Add zero-mean uniform noise of +-amplitude to ``img`` in place (saturating)."""
    size = img.shape[0]
    oy, ox = int(rng.random() * size), int(rng.random() * size)
    crop = _noise_bank(seed, size, amplitude)[oy : oy + size, ox : ox + size]
    cv2.subtract(cv2.add(img, crop, dst=img), (amplitude,) * 3 + (0,), dst=img)


def _odd(x: float) -> int:
    return max(1, int(x) // 2 * 2 + 1)


def _day(
    img: np.ndarray, rng: np.random.Generator, lay: _Layout, objects: list[_Object]
) -> np.ndarray:
    return cv2.convertScaleAbs(img, alpha=uniform(rng, 0.92, 1.08))


def _dusk(
    img: np.ndarray, rng: np.random.Generator, lay: _Layout, objects: list[_Object]
) -> np.ndarray:
    """Darker, with an orange cast (BGR: blue cut most, red kept)."""
    gain = uniform(rng, 0.6, 0.75) * np.array([0.55, 0.78, 1.05], np.float32)
    return np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def _night(
    img: np.ndarray, rng: np.random.Generator, lay: _Layout, objects: list[_Object]
) -> np.ndarray:
    """Dark and low-contrast, with glowing car lamps and street lights."""
    dark = img.astype(np.float32) * uniform(rng, 0.18, 0.28) + 8
    glow = np.zeros_like(dark)
    for obj in objects:
        if obj.cls != 0:
            continue
        x1, y1, x2, y2 = obj.box
        w, h = x2 - x1, y2 - y1
        r = max(1, int(0.09 * w))
        colour = (40, 40, 255) if rng.random() < 0.5 else (170, 235, 255)
        for lx in (x1 + int(0.18 * w), x2 - int(0.18 * w)):
            cv2.circle(glow, (lx, y1 + int(0.58 * h)), r, colour, -1)
    for _ in range(rng.integers(1, 4)):
        centre = (int(rng.integers(0, lay.size)), int(rng.integers(0, max(1, lay.horizon))))
        cv2.circle(glow, centre, max(1, lay.size // 40), (150, 220, 255), -1)
    glow = cv2.GaussianBlur(glow, (0, 0), max(0.8, lay.size / 128))
    return np.clip(dark + 1.6 * glow, 0, 255).astype(np.uint8)


def _fog(
    img: np.ndarray, rng: np.random.Generator, lay: _Layout, objects: list[_Object]
) -> np.ndarray:
    """Blend towards grey, most at the horizon where things are far away."""
    strength = uniform(rng, 0.45, 0.65)
    rows = np.arange(lay.size, dtype=np.float32)
    depth = np.clip((rows - lay.horizon) / (lay.size - lay.horizon), 0, 1)
    alpha = (strength * (1 - 0.45 * depth))[:, None, None]
    grey = np.float32(uniform(rng, 175, 205))
    return (img.astype(np.float32) * (1 - alpha) + grey * alpha).astype(np.uint8)


def _rain(
    img: np.ndarray, rng: np.random.Generator, lay: _Layout, objects: list[_Object]
) -> np.ndarray:
    """Slanted bright streaks over a slightly darker, noisy image."""
    s = lay.size
    streaks = np.zeros_like(img)
    slant = uniform(rng, -0.35, 0.35)
    n = int(s * 0.7)
    starts = rng.integers(0, s, size=(n, 2))
    ends = starts + (rng.uniform(0.04, 0.1, size=(n, 1)) * s * (slant, 1.0)).astype(np.int64)
    for (x0, y0), (x1, y1) in zip(starts.tolist(), ends.tolist(), strict=True):
        cv2.line(streaks, (x0, y0), (x1, y1), (200, 200, 200), 1)
    return cv2.addWeighted(img, 0.85, streaks, 0.5, 0)  # render_image adds the rain noise


def _blur(
    img: np.ndarray, rng: np.random.Generator, lay: _Layout, objects: list[_Object]
) -> np.ndarray:
    """Defocus (Gaussian) or motion blur, sized relative to the image."""
    scale = lay.size / 128
    if rng.random() < 0.5:
        return cv2.GaussianBlur(img, (0, 0), uniform(rng, 1.0, 1.6) * scale)
    k = _odd(uniform(rng, 5, 8) * scale)
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2, :] = 1.0 / k
    angle = uniform(rng, -30, 30)
    rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), angle, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (k, k))
    return cv2.filter2D(img, -1, kernel / max(kernel.sum(), 1e-6))


_Effect = Callable[[np.ndarray, np.random.Generator, _Layout, list[_Object]], np.ndarray]
_DOMAIN_EFFECTS: dict[str, _Effect] = {
    "day": _day,
    "dusk": _dusk,
    "night": _night,
    "fog": _fog,
    "rain": _rain,
    "blur": _blur,
}
