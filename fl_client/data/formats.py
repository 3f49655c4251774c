"""Read an Ultralytics ``data.yaml`` (Roboflow exports included): the client's view of its data.

A client trains on the shard the server wrote for it and reads its ``data.yaml`` for drift
statistics and fault injection; the server's dataset loader (``fl_server.data.layout``) reads
the same files through :func:`read_data_yaml`. What decides that a path belongs to a dataset
(:class:`Extent`) lives here too, so both sides refuse the same escapes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fl_client.data.errors import DataError, Issue, one_line

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}
)
SPLITS = ("train", "val", "test")
COCO_CACHE_DIR = ".fedyolo_yolo_labels"


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

    def images(self, split: str, extent: Extent | None = None) -> list[Path]:
        """Every image path of ``split`` (empty when the yaml has no such split).

        With ``extent``, an entry outside the dataset is recorded there and not walked.
        A folder entry that is ``/`` or a system folder is refused (DataError), never walked.
        """
        images: list[Path] = []
        for item, path in self._resolved(split):
            if extent is not None and not extent.admits(path, f"{split} entry {item!r}"):
                continue
            if path.is_dir():
                refuse_system_folder(path, f"dataset {self.path}: {split} entry {item!r}")
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


def _read_yaml(yaml_path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(yaml_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"dataset {yaml_path}: cannot read YAML ({one_line(exc)})") from exc
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
    refuse_system_folder(root, f"dataset {yaml_path}: path: {base or root}")
    return root


_SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


def refuse_system_folder(folder: Path, what: str) -> None:
    """DataError when ``folder`` is the filesystem root or lies in a kernel filesystem."""
    real = folder.resolve()
    if real == Path(real.anchor) or any(real.is_relative_to(s) for s in _SYSTEM_FOLDERS):
        raise DataError(
            f"{what} is {real}, the filesystem root or a system folder; "
            "point it at the dataset's own folder"
        )


@dataclass
class Extent:
    """What belongs to a dataset: files whose real path (links followed) lies under its root,
    or under ``links_into`` (see ``fl_server.data.layout.load_dataset``).

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


def user_cache_dir() -> Path:
    """fedyolo's cache in the user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fedyolo"
