"""The one in-memory shape of a dataset the server prepares: samples and their dataset.

Everything downstream of loading (checks, partitioning, shard writing) works on
:class:`Dataset`, so the on-disk format (YOLO yaml, Roboflow export, COCO JSON) matters only
in ``layout`` and ``coco``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_client.data.errors import Issue


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
