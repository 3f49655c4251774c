"""Find a dataset on disk: a data.yaml, a folder holding one, or a COCO JSON file.

The server prepares a run from whatever layout the user has (Ultralytics YOLO, a Roboflow
export, COCO); this turns it into one :class:`~fl_server.data.samples.Dataset`, with each
image's domain from ``meta.jsonl`` or its folder. Labels are always YOLO text files; COCO
annotations are converted once (``coco``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fl_client.data.errors import DataError
from fl_client.data.formats import Extent, label_path_for, read_data_yaml, user_cache_dir
from fl_server.data.coco import load_coco_dataset
from fl_server.data.samples import Dataset, Sample

log = logging.getLogger(__name__)

_YAML_NAMES = ("data.yaml", "data.yml")
_META_FILE = "meta.jsonl"
_EXPECTED = "expected an Ultralytics data.yaml, a folder containing data.yaml, or a COCO .json file"


def load_dataset(
    path: Path | str, cache_dir: Path | str | None = None, *, links_into: Iterable[Path] = ()
) -> Dataset:
    """Load a dataset from a data.yaml, a folder holding one, or a COCO JSON file.

    ``cache_dir``: where COCO's converted YOLO labels go (``data.cache_dir`` in a run; the
    user's cache, ``$XDG_CACHE_HOME/fedyolo``, otherwise); never inside the dataset.
    Data stays inside its dataset (``fl_client.data.formats.Extent``): an image, label or split
    entry whose real path (links followed) is outside the dataset's root is an
    ``outside_dataset`` finding and is never read. ``links_into``: folders outside the root
    that its links may point into, as a shard written by ``write_partition`` links into the
    dataset it was cut from.
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
        return load_coco_dataset(path, Path(cache_dir) if cache_dir else user_cache_dir())
    raise DataError(f"dataset {path}: unsupported file type {suffix or '(none)'}; {_EXPECTED}")


def _load_yaml_dataset(yaml_path: Path, links_into: Iterable[Path] = ()) -> Dataset:
    """Ultralytics data.yaml, including Roboflow exports with their ``../train/images`` quirk."""
    spec = read_data_yaml(yaml_path)
    extent = Extent(spec.root, tuple(Path(p).resolve() for p in links_into))
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


def _make_sample(image: Path, split: str, meta: _MetaIndex, extent: Extent) -> Sample | None:
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
