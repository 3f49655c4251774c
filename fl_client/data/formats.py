"""Read detection datasets (Ultralytics YOLO, Roboflow exports, COCO JSON) into samples.

Everything downstream (checks, partitioning, shard writing) works on one in-memory
shape, :class:`Dataset`, so the on-disk format matters only here. Labels are always
YOLO text files; COCO annotations are converted once into a cache folder next to the
JSON file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fl_client.data.errors import DataError, Issue

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}
)
SPLITS = ("train", "val", "test")
COCO_CACHE_DIR = ".fedyolo_yolo_labels"
_YAML_NAMES = ("data.yaml", "data.yml")
_META_FILE = "meta.jsonl"
_EXPECTED = "expected an Ultralytics data.yaml, a folder containing data.yaml, or a COCO .json file"


@dataclass(frozen=True)
class Sample:
    """One image, its YOLO label file (None = no label file) and descriptive attributes.

    ``attrs`` (e.g. ``{"domain": "night"}``) drives domain-aware partitioning; it is
    left out of the hash so samples can live in sets.
    """

    image: Path
    label: Path | None
    split: str
    attrs: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class Dataset:
    """A loaded dataset: class names, samples in a stable order, and where it lives.

    ``issues``: what loading found and did (a COCO box of an unknown category dropped, an image
    outside the dataset skipped, an EXIF-rotated image's boxes turned); the data check reports them.
    """

    names: list[str]
    samples: list[Sample]
    root: Path
    issues: list[Issue] = field(default_factory=list)

    @property
    def nc(self) -> int:
        return len(self.names)


# ------------------------------------------------------------------------ entry point


def load_dataset(
    path: Path | str, cache_dir: Path | str | None = None, *, links_into: Iterable[Path] = ()
) -> Dataset:
    """Load a dataset from a data.yaml, a folder holding one, or a COCO JSON file.

    ``cache_dir``: where COCO's converted YOLO labels go (``data.cache_dir`` in a run; the
    user's cache, ``$XDG_CACHE_HOME/fedyolo``, otherwise); never inside the dataset.
    Data stays inside its dataset (:class:`_Extent`): an image, label or split entry whose real
    path (links followed) is outside the dataset's root is an ``outside_dataset`` finding and is
    never read. ``links_into``: folders outside the root that its links may point into, as a
    shard written by ``write_partition`` links into the dataset it was cut from.
    Raises :class:`DataError` (one line) when the path is missing or not a dataset.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"dataset {path}: not found; {_EXPECTED}")
    if path.is_dir():
        yaml_path = next((path / n for n in _YAML_NAMES if (path / n).is_file()), None)
        if yaml_path is None:
            raise DataError(f"dataset {path}: folder has no data.yaml; {_EXPECTED}")
        return _load_yaml_dataset(yaml_path, links_into)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return _load_yaml_dataset(path, links_into)
    if suffix == ".json":
        return _load_coco_dataset(path, Path(cache_dir) if cache_dir else user_cache_dir())
    raise DataError(f"dataset {path}: unsupported file type {suffix or '(none)'}; {_EXPECTED}")


def label_path_for(image: Path) -> Path:
    """The Ultralytics label path of an image: last ``/images/`` -> ``/labels/``, suffix -> .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    text = str(image)
    if sa in text:
        head, tail = text.rsplit(sa, 1)
        text = f"{head}{sb}{tail}"
    return Path(text).with_suffix(".txt")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


# ------------------------------------------------------------------- Ultralytics yaml


@dataclass(frozen=True)
class DataYaml:
    """An Ultralytics ``data.yaml`` as read once: class names, root and split entries.

    The one reader of a ``data.yaml`` for the dataset loader, the client's drift
    statistics and fault injection. ``entries`` holds each split's entry as written
    (Roboflow's ``train/ valid/ test/`` folders when the yaml names none).
    """

    path: Path
    names: list[str]
    root: Path
    entries: dict[str, Any]

    def resolved(self, split: str) -> list[Path]:
        """The folders, list files or images a split entry names (DataError if missing)."""
        return [path for _, path in self._resolved(split)]

    def images(self, split: str, extent: _Extent | None = None) -> list[Path]:
        """Every image path of ``split`` (empty when the yaml has no such split).

        With ``extent``, an entry outside the dataset is recorded there and not walked.
        A folder entry that is ``/`` or a system folder is refused (DataError), never walked.
        """
        images: list[Path] = []
        for item, path in self._resolved(split):
            if extent is not None and not extent.admits(path, f"{split} entry {item!r}"):
                continue
            if path.is_dir():
                _refuse_system_folder(path, f"dataset {self.path}: {split} entry {item!r}")
                images += sorted(p for p in path.rglob("*") if is_image(p) and p.is_file())
            elif path.suffix.lower() == ".txt":
                images += _images_from_list(path, self.root)
            elif is_image(path):
                images.append(path)
            else:
                raise DataError(
                    f"dataset {self.path}: {split} entry {item!r} "
                    "is neither a folder, a .txt list nor an image"
                )
        return images

    def _resolved(self, split: str) -> Iterator[tuple[str, Path]]:
        entry = self.entries.get(split)
        for item in (entry if isinstance(entry, list) else [entry]) if entry else []:
            resolved = _resolve_entry(str(item), self.root, self.path.parent)
            if resolved is not None:
                yield str(item), resolved
            elif split == "test":
                log.warning("dataset %s: test entry %s not found; skipping it", self.path, item)
            else:
                raise DataError(
                    f"dataset {self.path}: {split} entry {item!r} not found "
                    f"(looked under {self.root})"
                )


def read_data_yaml(yaml_path: Path | str) -> DataYaml:
    """Read a ``data.yaml`` (Roboflow exports included); DataError names what is wrong."""
    yaml_path = Path(yaml_path).expanduser().absolute()
    config = _read_yaml(yaml_path)
    entries = {split: config.get(split) for split in SPLITS if config.get(split)}
    if not entries:
        entries = _discover_split_folders(yaml_path.parent)
    if not entries:
        raise DataError(
            f"dataset {yaml_path}: no train/val/test entries and no train/ valid/ test/ folders"
        )
    return DataYaml(
        yaml_path, _parse_names(config, yaml_path), _yaml_root(config, yaml_path), entries
    )


def _load_yaml_dataset(yaml_path: Path, links_into: Iterable[Path] = ()) -> Dataset:
    """Ultralytics data.yaml, including Roboflow exports with their ``../train/images`` quirk."""
    spec = read_data_yaml(yaml_path)
    extent = _Extent(spec.root, tuple(Path(p).resolve() for p in links_into))
    samples: list[Sample] = []
    seen: set[Path] = set()
    meta = _MetaIndex()
    for split in spec.entries:
        for image in spec.images(split, extent):
            key = image.resolve()
            if key in seen:  # train and val often point at the same images
                continue
            seen.add(key)
            if not extent.admits(image, "image"):
                continue
            sample = _make_sample(image, split, meta, extent)
            if sample is not None:
                samples.append(sample)
    for issue in extent.issues:
        log.warning("%s: %s (%s)", issue.path, issue.detail, issue.action)
    log.info("loaded %d images (%d classes) from %s", len(samples), len(spec.names), spec.path)
    return Dataset(names=spec.names, samples=samples, root=spec.root, issues=extent.issues)


def _read_yaml(yaml_path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(yaml_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"dataset {yaml_path}: cannot read YAML ({_one_line(exc)})") from exc
    if not isinstance(config, dict):
        raise DataError(
            f"dataset {yaml_path}: expected a YAML mapping with names and train/val entries"
        )
    return config


def _parse_names(config: dict[str, Any], yaml_path: Path) -> list[str]:
    """Class names from a list or an ``{id: name}`` mapping (ids must be 0..nc-1).

    An ``nc`` that disagrees with ``names`` is an error naming both (Ultralytics refuses it too).
    """
    names, nc = config.get("names"), config.get("nc")
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc < 1):
        raise DataError(f"dataset {yaml_path}: nc must be a positive integer, got {nc!r}")
    if names is None and nc is not None:
        return [str(i) for i in range(nc)]
    if isinstance(names, list) and names:
        parsed = [str(n) for n in names]
    elif isinstance(names, dict) and names:
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as exc:
            raise DataError(f"dataset {yaml_path}: names keys must be integer class ids") from exc
        if sorted(by_id) != list(range(len(by_id))):
            raise DataError(
                f"dataset {yaml_path}: names ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}"
            )
        parsed = [by_id[i] for i in range(len(by_id))]
    else:
        raise DataError(
            f"dataset {yaml_path}: missing 'names' (a list or {{id: name}} mapping of classes)"
        )
    if nc is not None and nc != len(parsed):
        raise DataError(
            f"dataset {yaml_path}: nc is {nc} but names lists {len(parsed)} classes "
            f"({', '.join(parsed[:8])}{', ...' if len(parsed) > 8 else ''}); make them agree"
        )
    return parsed


def _yaml_root(config: dict[str, Any], yaml_path: Path) -> Path:
    """The dataset root: ``path:`` (relative to the yaml's folder) or the yaml's folder.

    ``/`` or a system folder (``/proc``, ``/sys``, ``/dev``) is refused: walking it would read
    the whole machine (and die on ``/proc``).
    """
    base = config.get("path")
    if not base:
        root = yaml_path.parent.resolve()
    else:
        given = Path(str(base)).expanduser()
        root = (given if given.is_absolute() else yaml_path.parent / given).resolve()
    _refuse_system_folder(root, f"dataset {yaml_path}: path: {base or root}")
    return root


_SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


def _refuse_system_folder(folder: Path, what: str) -> None:
    """DataError when ``folder`` is the filesystem root or lies in a kernel filesystem."""
    real = folder.resolve()
    if real == Path(real.anchor) or any(real.is_relative_to(s) for s in _SYSTEM_FOLDERS):
        raise DataError(
            f"{what} is {real}, the filesystem root or a system folder; "
            "point it at the dataset's own folder"
        )


@dataclass
class _Extent:
    """What belongs to a dataset: files whose real path (links followed) lies under its root,
    or under ``links_into`` (see :func:`load_dataset`).

    Anything else (a link to ``/etc/passwd`` as a label, a COCO ``file_name`` of ``../x.jpg``)
    is one ``outside_dataset`` finding in ``issues`` and is not followed: never read, never
    linked into a shard. The one place that decides it, for YAML and COCO datasets.
    """

    root: Path
    links_into: tuple[Path, ...] = ()
    issues: list[Issue] = field(default_factory=list)

    def admits(self, path: Path, what: str, where: Path | None = None) -> bool:
        """True when ``path`` is inside; else record the finding (``what`` names the thing,
        ``where`` the file it is reported against, ``path`` by default) and return False."""
        real = path.resolve()
        if any(real.is_relative_to(r) for r in (self.root, *self.links_into)):
            return True
        link = f" (it resolves to {real})" if real != path.absolute() else ""
        self.issues.append(
            Issue(
                "outside_dataset",
                str(where or path),
                None,
                f"{what} is outside the dataset folder {self.root}{link}; not followed",
                "skipped",
            )
        )
        return False


def _discover_split_folders(folder: Path) -> dict[str, str]:
    """Roboflow-style ``train/ valid/ test/`` folders, each with an ``images/`` subfolder."""
    found = {}
    for split, dirname in (("train", "train"), ("val", "valid"), ("val", "val"), ("test", "test")):
        if split not in found and (folder / dirname / "images").is_dir():
            found[split] = f"{dirname}/images"
    return found


def _resolve_entry(entry: str, root: Path, yaml_dir: Path) -> Path | None:
    """Find a split entry: absolute, under ``path:``, under the yaml folder.

    Roboflow exports write ``../train/images`` in a data.yaml that sits next to
    ``train/``; that only resolves with the leading ``../`` stripped, so try that too.
    """
    candidate = Path(entry).expanduser()
    if candidate.is_absolute():
        return candidate if candidate.exists() else None
    stripped = entry
    while stripped.startswith("../"):
        stripped = stripped[3:]
    for base, rel in ((root, entry), (yaml_dir, entry), (root, stripped), (yaml_dir, stripped)):
        path = base / rel
        if path.exists():
            return path
    return None


def _images_from_list(list_file: Path, root: Path) -> Iterator[Path]:
    """Image paths listed one per line; relative ones against the list's folder, then the root."""
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line).expanduser()
        if not path.is_absolute():
            near = list_file.parent / path
            path = near if near.exists() else root / path
        yield path


def _make_sample(image: Path, split: str, meta: _MetaIndex, extent: _Extent) -> Sample | None:
    """The image's sample; None when its label file is outside the dataset (boxes unknown)."""
    label = label_path_for(image)
    if label.is_file() and not extent.admits(label, f"label file of {image.name}"):
        return None
    return Sample(
        image=image,
        label=label if label.is_file() else None,
        split=split,
        attrs=meta.attrs_for(image) or {"domain": _default_domain(image, split)},
    )


def _default_domain(image: Path, split: str) -> str:
    """Without metadata: the folder above ``images/`` (``night/images`` -> night) or the split."""
    parts = image.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "images":
            return parts[i - 1]
    return split


class _MetaIndex:
    """Per-image attributes from ``meta.jsonl`` files (as written by the synthetic generator).

    A ``meta.jsonl`` is looked for next to each ``images/`` folder, read once, and
    maps image paths (relative to the meta file) to their other fields.
    """

    def __init__(self) -> None:
        self._by_folder: dict[Path, dict[Path, dict[str, Any]]] = {}

    def attrs_for(self, image: Path) -> dict[str, Any] | None:
        """The image's record; a symlinked image (a written shard) falls back to its target's."""
        target = image.resolve()
        for path in dict.fromkeys((image, target)):
            for folder in (path.parent.parent, path.parent):
                found = self._records(folder).get(target)
                if found is not None:
                    return dict(found)
        return None

    def _records(self, folder: Path) -> dict[Path, dict[str, Any]]:
        if folder not in self._by_folder:
            self._by_folder[folder] = self._read(folder / _META_FILE)
        return self._by_folder[folder]

    @staticmethod
    def _read(meta_path: Path) -> dict[Path, dict[str, Any]]:
        if not meta_path.is_file():
            return {}
        records = {}
        for n, line in enumerate(meta_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image = (meta_path.parent / record.pop("image")).resolve()
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                log.warning("%s:%d: not a JSON object with an 'image' key; ignored", meta_path, n)
                continue
            records[image] = record
        return records


# ----------------------------------------------------------------------------- COCO


def user_cache_dir() -> Path:
    """fedyolo's cache in the user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fedyolo"


def _load_coco_dataset(json_path: Path, cache_dir: Path) -> Dataset:
    """COCO detection JSON: boxes converted to YOLO labels in a cache outside the dataset.

    Boxes are normalised in the frame the model sees: OpenCV (and so Ultralytics) applies an
    image's EXIF orientation when decoding it.
    """
    import hashlib

    json_path = json_path.absolute()
    coco = _read_coco(json_path)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(categories)}
    names = [str(c.get("name", c["id"])) for c in categories]
    extent = _Extent(json_path.parent.resolve())
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
        raise DataError(f"dataset {json_path}: cannot read JSON ({_one_line(exc)})") from exc
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
    import math

    return (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        and all(math.isfinite(v) for v in bbox)
    )


def _resolve_coco_image(file_name: str, folder: Path) -> Path:
    """COCO file names are relative to the JSON's folder or to an ``images/`` folder beside it.

    The first candidate that exists, else the name under the folder (missing: the data check
    reports it as unreadable); whether it is inside the dataset is the caller's :class:`_Extent`.
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
        from PIL import Image

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
    import cv2
    import numpy as np

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
    import hashlib
    import re

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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
