"""Convert a COCO detection JSON into YOLO labels, in a cache outside the dataset.

COCO boxes are pixel ``[x, y, w, h]`` in the frame they were drawn in; YOLO labels are
normalised centres in the frame the model sees (OpenCV applies EXIF orientation). Turning,
skipping and refusing are decided here and reported as findings the data check shows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from fl_client.data.errors import DataError, Issue, one_line
from fl_client.data.formats import COCO_CACHE_DIR, Extent
from fl_server.data.samples import Dataset, Sample

log = logging.getLogger(__name__)


def load_coco_dataset(json_path: Path, cache_dir: Path) -> Dataset:
    """COCO detection JSON: boxes converted to YOLO labels in a cache outside the dataset.

    Boxes are normalised in the frame the model sees: OpenCV (and so Ultralytics) applies an
    image's EXIF orientation when decoding it.
    """
    json_path = json_path.absolute()
    coco = _read_coco(json_path)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(categories)}
    names = [str(c.get("name", c["id"])) for c in categories]
    extent = Extent(json_path.parent.resolve())
    issues = extent.issues
    boxes = _coco_boxes_by_image(coco["annotations"], cat_index, json_path, issues)
    key = hashlib.sha256(str(json_path).encode()).hexdigest()[:12]  # one folder per JSON file
    cache = cache_dir.expanduser().resolve() / COCO_CACHE_DIR / f"{json_path.stem}-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    split = _split_from_name(json_path.stem)
    samples, written = [], set()
    for entry in coco["images"]:
        image = _resolve_coco_image(str(entry["file_name"]), json_path.parent)
        what = f"image {entry.get('id')!r}: file_name {entry['file_name']!r}"
        if not extent.admits(image, what, where=json_path):
            continue
        label = None
        lines = boxes.get(entry["id"], [])
        if lines:
            frame = _coco_frame(entry, image, issues)
            if frame is _SKIP:
                continue
            if frame is not None:
                label = cache / _coco_label_name(entry)
                _write_atomic(label, "".join(_coco_line(c, frame(b)) for c, b in lines))
                written.add(label)
        attrs = {"domain": str(entry.get("domain", split))}
        samples.append(Sample(image=image, label=label, split=split, attrs=attrs))
    _remove_stale(cache, written)
    for issue in issues:
        log.warning("%s: %s (%s)", issue.path, issue.detail, issue.action)
    log.info("loaded %d images (%d classes) from COCO %s", len(samples), len(names), json_path)
    return Dataset(names=names, samples=samples, root=json_path.parent.resolve(), issues=issues)


def _read_coco(json_path: Path) -> dict[str, Any]:
    try:
        coco = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"dataset {json_path}: cannot read JSON ({one_line(exc)})") from exc
    missing = [
        k
        for k in ("images", "annotations", "categories")
        if not isinstance(coco, dict) or k not in coco
    ]
    if missing:
        raise DataError(
            f"dataset {json_path}: not a COCO detection file (missing {', '.join(missing)})"
        )
    if not coco["categories"]:
        raise DataError(f"dataset {json_path}: COCO file has no categories")
    return coco


def _coco_boxes_by_image(
    annotations: Iterable[dict[str, Any]],
    cat_index: dict[Any, int],
    json_path: Path,
    issues: list[Issue],
) -> dict[Any, list[tuple[int, list[float]]]]:
    """Group non-crowd boxes by image id, with category ids remapped to 0..nc-1.

    A box of a category the file does not define, or without a 4-number bbox, is dropped
    and recorded (its image keeps its other boxes).
    """
    boxes: dict[Any, list[tuple[int, list[float]]]] = {}
    for ann in annotations:
        if ann.get("iscrowd", 0):
            continue
        where = f"annotation {ann.get('id')!r} of image {ann.get('image_id')!r}"
        if ann.get("category_id") not in cat_index:
            issues.append(
                Issue(
                    "unknown_category",
                    str(json_path),
                    None,
                    f"{where}: category_id {ann.get('category_id')!r} is not in categories; "
                    "box dropped",
                    "skipped",
                )
            )
            continue
        bbox = ann.get("bbox")
        if not _is_box(bbox):
            issues.append(
                Issue(
                    "bad_value",
                    str(json_path),
                    None,
                    f"{where}: bbox {bbox!r} is not [x, y, width, height]; box dropped",
                    "skipped",
                )
            )
            continue
        boxes.setdefault(ann["image_id"], []).append((cat_index[ann["category_id"]], bbox))
    return boxes


def _is_box(bbox: Any) -> bool:
    return (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        and all(math.isfinite(v) for v in bbox)
    )


def _resolve_coco_image(file_name: str, folder: Path) -> Path:
    """COCO file names are relative to the JSON's folder or to an ``images/`` folder beside it.

    The first candidate that exists, else the name under the folder (missing: the data check
    reports it as unreadable); whether it is inside the dataset is the caller's :class:`Extent`.
    """
    candidates = [
        folder / file_name,
        folder / "images" / file_name,
        folder / "images" / Path(file_name).name,
    ]
    if not candidates[0].resolve().is_relative_to(folder.resolve()):
        return candidates[0]  # leaves the folder: the caller records it; nothing is looked up
    return next((c for c in candidates if c.is_file()), candidates[0])


_SKIP = object()

# EXIF orientation -> the box (x, y, w, h) in the stored W x H frame, in the displayed frame.
_ORIENT = {
    2: lambda x, y, w, h, W, H: (W - x - w, y, w, h),
    3: lambda x, y, w, h, W, H: (W - x - w, H - y - h, w, h),
    4: lambda x, y, w, h, W, H: (x, H - y - h, w, h),
    5: lambda x, y, w, h, W, H: (y, x, h, w),
    6: lambda x, y, w, h, W, H: (H - y - h, x, h, w),
    7: lambda x, y, w, h, W, H: (H - y - h, W - x - w, h, w),
    8: lambda x, y, w, h, W, H: (y, W - x - w, h, w),
}


def _coco_frame(entry: dict[str, Any], image: Path, issues: list[Issue]):
    """A function from a COCO bbox to ``(cx, cy, w, h)`` normalised in the displayed frame.

    The displayed frame is the stored image turned by its EXIF orientation: what OpenCV, and so
    Ultralytics, trains on. COCO ``width``/``height`` give the frame the boxes were drawn in (a
    uniformly resized copy of the images keeps its boxes right). Of the shape of the displayed
    image: used as they are. Of the shape of the stored pixels only (a turned image): the boxes
    are turned with the image (``exif_rotated``, repaired). Of neither: the boxes cannot be
    placed and the image is skipped (``_SKIP``, recorded in ``issues``). None for an unreadable
    image: no label is written and the data check names it.
    """
    try:
        with Image.open(image) as im:
            W, H = (float(v) for v in im.size)
            orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - Pillow cannot open it: OpenCV (what training reads)?
        shown_hw = _cv2_shape(image)
        if shown_hw is None:
            return None  # no label: the data check names the unreadable image
        H, W = (float(v) for v in shown_hw)
        orientation = 1  # OpenCV has applied any EXIF rotation
    turn = _ORIENT.get(orientation)
    shown = (H, W) if orientation >= 5 and turn else (W, H)
    dw, dh = entry.get("width"), entry.get("height")
    declared = (float(dw), float(dh)) if _positive(dw) and _positive(dh) else None
    frame = declared or shown
    if declared is not None and not _same_shape(declared, shown):
        if turn is not None and _same_shape(declared, (W, H)):
            issues.append(
                Issue(
                    "exif_rotated",
                    str(image),
                    None,
                    f"EXIF orientation {orientation}: COCO {dw}x{dh} is the stored frame, "
                    f"the image is shown {shown[0]:g}x{shown[1]:g}; boxes turned with the image",
                    "repaired",
                )
            )
            dW, dH = declared
            size = (dH, dW) if orientation >= 5 else (dW, dH)
            return lambda b: _normalised(turn(*(float(v) for v in b), dW, dH), *size)
        issues.append(
            Issue(
                "bad_value",
                str(image),
                None,
                f"COCO width x height {dw}x{dh} has another shape than the image "
                f"({shown[0]:g}x{shown[1]:g} as shown); image skipped (its boxes cannot be placed)",
                "skipped",
            )
        )
        return _SKIP
    if turn is not None:
        issues.append(
            Issue(
                "exif_rotated",
                str(image),
                None,
                f"EXIF orientation {orientation}: stored {W:g}x{H:g}, shown "
                f"{shown[0]:g}x{shown[1]:g}; boxes taken as drawn on the shown image",
                "kept",
            )
        )
    return lambda b: _normalised(b, *frame)


def _cv2_shape(image: Path) -> tuple[int, int] | None:
    """(height, width) as OpenCV decodes the file (a PFM, say, which Pillow cannot open)."""
    try:
        data = np.fromfile(image, np.uint8)
    except OSError:
        return None
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    return None if decoded is None else decoded.shape[:2]


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _same_shape(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Same aspect ratio within 2% (a resized copy keeps its shape up to rounding)."""
    return abs(a[0] / a[1] - b[0] / b[1]) <= 0.02 * (b[0] / b[1])


def _normalised(box, width: float, height: float) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in box)
    return (x + w / 2) / width, (y + h / 2) / height, w / width, h / height


def _coco_label_name(entry: dict[str, Any]) -> str:
    """A cache file name unique per image: the id plus the image's stem, in a safe alphabet.

    An id like ``../../x`` can never name a file outside the cache: anything but letters,
    digits, ``-`` and ``_`` becomes ``_``, and a name that changed gets a digest of the original.
    """
    raw = f"{entry['id']}_{Path(str(entry['file_name'])).stem}"
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", raw)[:120]
    if safe != raw:
        safe += "-" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{safe}.txt"


def _coco_line(cls: int, box: tuple[float, float, float, float]) -> str:
    cx, cy, w, h = box
    return f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n"


def _split_from_name(stem: str) -> str:
    lowered = stem.lower()
    return "val" if "val" in lowered else "test" if "test" in lowered else "train"


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so concurrent loaders never see half a label."""
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_stale(cache: Path, keep: set[Path]) -> None:
    for old in cache.glob("*.txt"):
        if old not in keep:
            old.unlink(missing_ok=True)
