"""Data checks: find broken images and labels, repair what is safe, report everything.

A run must never crash mid-round on one bad file, and a user must be able to see what
was wrong with their data: the server checks a dataset before cutting it into shards
(``fedyolo run``) or when asked (``fedyolo data check``). ``check_dataset`` decodes every
image fully, parses every label line, and returns the usable samples plus one :class:`Issue`
per finding.
Originals are never modified: repaired labels are written as copies under ``work_dir``.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageFile

from fl_client.data.errors import DataError, Issue, one_line
from fl_client.data.formats import is_image, label_path_for
from fl_client.data.labels import LabelLineError, format_box, numbered_lines, parse_line
from fl_server.data.samples import Dataset, Sample

log = logging.getLogger(__name__)

ISSUE_KINDS: tuple[str, ...] = (
    "unreadable_image",
    "truncated_image",
    "bad_columns",
    "bad_value",
    "class_out_of_range",
    "out_of_bounds",
    "zero_area",
    "duplicate_label",
    "background",
    "orphan_label",
    "unknown_category",
    "outside_dataset",
    "exif_rotated",
)
ACTIONS: tuple[str, ...] = ("skipped", "repaired", "kept")

_MIN_SIDE = 1e-4  # normalised; a box side below this is degenerate (sub-pixel at 10k px)
_TOLERANCE = 1e-6  # coordinates this far outside [0, 1] are float noise, not an issue
_JPEG_EOI = b"\xff\xd9"
_LOG_EVERY = 1000
FINDINGS_PER_KIND = 20  # per label file, kind and action; the rest is one record with a count
MAX_LABEL_BYTES = 32 << 20  # a YOLO label of thousands of long polygons is a few MB


@dataclass
class CheckReport:
    """Issues found in a dataset and the samples that remain usable after repair."""

    root: Path
    num_images: int
    issues: list[Issue] = field(default_factory=list)
    usable: list[Sample] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Issue count for every kind (zeros included, so the schema is stable)."""
        found: Counter[str] = Counter()
        for issue in self.issues:
            found[issue.kind] += issue.count
        return {kind: found.get(kind, 0) for kind in ISSUE_KINDS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "images": self.num_images,
            "usable": len(self.usable),
            "counts": self.counts,
            "issues": [asdict(issue) for issue in self.issues],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self, path: Path) -> Path:
        """Write the report as JSON (for scripts and CI) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    def summary(self, examples: int = 3) -> str:
        """A short human table: one row per issue kind found, the actions taken, and the
        first ``examples`` findings of each kind (file, line, what was wrong)."""
        head = f"dataset {self.root}: {self.num_images} images, {len(self.usable)} usable"
        if not self.issues:
            return f"{head}, no issues"
        by_kind: dict[str, list[Issue]] = {}
        for issue in self.issues:
            by_kind.setdefault(issue.kind, []).append(issue)
        rows = [head, f"{'kind':<20} {'count':>6}  action"]
        for kind in ISSUE_KINDS:
            found = by_kind.get(kind)
            if not found:
                continue
            actions = "/".join(sorted({i.action for i in found}))
            total = sum(i.count for i in found)
            rows.append(f"{kind:<20} {total:>6}  {actions}")
            for i in found[:examples]:
                where = i.path if i.line is None else f"{i.path}:{i.line}"
                rows.append(f"    {where}: {i.detail}")
            if total > examples:
                rows.append(f"    ... and {total - examples} more (see the JSON report)")
        return "\n".join(rows)


# ---------------------------------------------------------------------------- public


def check_dataset(ds: Dataset, work_dir: Path | None = None, repair: bool = True) -> CheckReport:
    """Check every sample of ``ds``; return the issues and the usable samples.

    With ``repair=True`` bad label lines are dropped or fixed and the cleaned label is
    written into ``work_dir`` (required as soon as one label needs it); with
    ``repair=False`` nothing is written and a sample whose label would change is
    skipped whole. Unreadable or truncated images are always skipped; images without
    a label file are kept as background. Raises :class:`DataError` when nothing usable
    remains.
    """
    if not ds.samples:
        found = ", ".join(f"{n} {kind}" for kind, n in Counter(i.kind for i in ds.issues).items())
        raise DataError(
            f"dataset {ds.root}: no usable images (no images found{'; ' + found if found else ''})"
        )
    report = CheckReport(root=ds.root, num_images=len(ds.samples))
    report.issues.extend(ds.issues)  # found while loading (COCO: categories, paths, EXIF)
    repaired_dir = Path(work_dir) if work_dir is not None else None
    for index, sample in enumerate(ds.samples):
        usable = _check_sample(index, sample, ds, repaired_dir, repair, report.issues)
        if usable is not None:
            report.usable.append(usable)
        if (index + 1) % _LOG_EVERY == 0:
            log.info("checked %d/%d images", index + 1, len(ds.samples))
    report.issues.extend(_orphan_labels(ds.samples))
    log.info(
        "data check of %s: %d of %d images usable, %d issues",
        ds.root,
        len(report.usable),
        len(ds.samples),
        sum(report.counts.values()),
    )
    if not report.usable:
        found = ", ".join(f"{n} {kind}" for kind, n in report.counts.items() if n)
        raise DataError(f"dataset {ds.root}: no usable images ({len(ds.samples)} images: {found})")
    return report


# --------------------------------------------------------------------------- samples


def _check_sample(
    index: int,
    sample: Sample,
    ds: Dataset,
    repaired_dir: Path | None,
    repair: bool,
    issues: list[Issue],
) -> Sample | None:
    """Check one sample; append its issues; return the sample to use, or None to skip it."""
    image_issue = check_image(sample.image)
    if image_issue is not None:
        issues.append(image_issue)
        return None
    if sample.label is None:
        issues.append(
            Issue(
                "background",
                str(sample.image),
                None,
                "no label file; used as a background image",
                "kept",
            )
        )
        return sample
    result = _check_label_file(sample.label, len(ds.names))
    if result.lines is None:  # the label file itself is unreadable: its boxes are unknown
        issues.extend(result.issues)
        return None
    if not result.changed:
        issues.extend(result.issues)
        return sample
    if not repair:
        issues.extend(
            replace(i, action="skipped", detail=f"{i.detail}; image skipped (repair off)")
            for i in result.issues
        )
        return None
    issues.extend(result.issues)
    if repaired_dir is None:
        raise DataError(
            f"dataset {ds.root}: label {sample.label} needs repair; "
            "pass a work_dir for cleaned copies "
            "(originals are never modified)"
        )
    cleaned = repaired_dir / f"{index:06d}_{_short_hash(sample.label)}_{sample.label.name}"
    cleaned.parent.mkdir(parents=True, exist_ok=True)
    cleaned.write_text("".join(f"{line}\n" for line in result.lines))
    return replace(sample, label=cleaned)


def _short_hash(path: Path) -> str:
    return hashlib.sha1(str(path).encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------- images


def check_image(path: Path) -> Issue | None:
    """Decode ``path`` fully; return an ``unreadable_image``/``truncated_image`` issue or None."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Issue(
            "unreadable_image", str(path), None, f"cannot read file: {one_line(exc)}", "skipped"
        )
    if not data:
        return Issue("unreadable_image", str(path), None, "empty file", "skipped")
    try:
        with _strict_pil(), Image.open(io.BytesIO(data)) as im:
            fmt, size = im.format, im.size
            im.load()
    except OSError as exc:  # includes UnidentifiedImageError
        if "truncated" in str(exc):
            return Issue("truncated_image", str(path), None, one_line(exc), "skipped")
        if _cv2_decodes(data):  # a format Pillow lacks but OpenCV (and so Ultralytics) reads
            return None
        return Issue("unreadable_image", str(path), None, _undecodable(data, exc), "skipped")
    except ImportError as exc:
        # Ultralytics patches Image.open to retry unidentified files with pi-heif; without it
        # installed that surfaces as "No module named 'pi_heif'" for ANY unidentified file, a
        # text file named .jpg included: say what the file is instead.
        if _cv2_decodes(data):
            return None
        return Issue("unreadable_image", str(path), None, _undecodable(data, exc), "skipped")
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return Issue(
            "unreadable_image", str(path), None, f"cannot decode: {one_line(exc)}", "skipped"
        )
    if min(size) < 1:
        return Issue("unreadable_image", str(path), None, f"image has size {size}", "skipped")
    if fmt == "JPEG" and _JPEG_EOI not in data[-32:]:
        return Issue(
            "truncated_image", str(path), None, "JPEG end-of-image marker missing", "skipped"
        )
    return None


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    """Make Pillow raise on truncated files even if another library relaxed it globally."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _undecodable(data: bytes, exc: BaseException) -> str:
    """What an undecodable file is: damaged image data, HEIC without its codec, or no image."""
    fmt = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
    if fmt is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "WebP"
    if fmt is not None:
        return f"cannot decode: damaged {fmt} data ({one_line(exc)})"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif"):
        return f"cannot decode: {data[8:12].decode()} image; reading it needs the pi-heif package"
    head = data[:64]
    try:  # incremental: a multi-byte character cut at byte 64 is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        shown = " ".join(text.split())[:40]
        return f"not an image: the file holds text ({shown!r}...)"
    return f"not an image: unknown format (first bytes {head[:8].hex(' ')})"


def _cv2_decodes(data: bytes) -> bool:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


# ---------------------------------------------------------------------------- labels


@dataclass
class _LabelResult:
    lines: list[str] | None  # the cleaned label, one YOLO line each; None: unreadable file
    issues: list[Issue]
    changed: bool  # True when ``lines`` differ from the file (a copy must be written)


def _check_label_file(path: Path, nc: int) -> _LabelResult:
    try:
        text = _read_label(path)
    except (OSError, UnicodeDecodeError) as exc:
        issue = Issue(
            "bad_value", str(path), None, f"cannot read label file: {one_line(exc)}", "skipped"
        )
        return _LabelResult(None, [issue], changed=True)
    return _check_label_text(text, nc, str(path))


def _read_label(path: Path) -> str:
    """A label file's text, never more than ``MAX_LABEL_BYTES`` read (OSError past that)."""
    with open(path, "rb") as f:
        data = f.read(MAX_LABEL_BYTES + 1)
    if len(data) > MAX_LABEL_BYTES:
        raise OSError(f"larger than {MAX_LABEL_BYTES >> 20} MiB, not a YOLO label file")
    return data.decode()


class _Findings:
    """One label file's findings: the first ``FINDINGS_PER_KIND`` of each kind and action in
    full, the rest counted, so memory and the report stay small whatever the file holds."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.kept: list[Issue] = []
        self.seen: Counter[tuple[str, str]] = Counter()

    def add(self, issue: Issue) -> None:
        key = (issue.kind, issue.action)
        self.seen[key] += 1
        if self.seen[key] <= FINDINGS_PER_KIND:
            self.kept.append(issue)

    def issues(self) -> list[Issue]:
        rest = [
            Issue(
                kind,
                self.where,
                None,
                f"and {n - FINDINGS_PER_KIND} more {kind} findings ({action}) in this file",
                action,
                count=n - FINDINGS_PER_KIND,
            )
            for (kind, action), n in self.seen.items()
            if n > FINDINGS_PER_KIND
        ]
        return self.kept + rest


def _check_label_text(text: str, nc: int, where: str) -> _LabelResult:
    """Validate YOLO label text line by line; drop or repair bad lines."""
    lines: list[str] = []
    findings = _Findings(where)
    seen: set[tuple[float, ...]] = set()
    changed = False
    for number, raw in numbered_lines(text):
        line_issues, box, text_out = _check_line(raw, nc, where, number)
        for issue in line_issues:
            findings.add(issue)
        if box is not None:
            key = tuple(round(v, 6) for v in box)
            if key in seen:
                findings.add(
                    Issue(
                        "duplicate_label", where, number, "same box as an earlier line", "skipped"
                    )
                )
                box = None
            else:
                seen.add(key)
        if box is None or any(i.action == "repaired" for i in line_issues):
            changed = True
        if box is not None:
            lines.append(text_out)
    return _LabelResult(lines, findings.issues(), changed)


def _check_line(
    raw: str, nc: int, where: str, number: int
) -> tuple[list[Issue], tuple[float, ...] | None, str]:
    """Check one label line.

    Returns its issues, the final ``(cls, cx, cy, w, h)`` (None when dropped) and its text.
    """
    issues: list[Issue] = []

    def fail(kind: str, detail: str) -> tuple[list[Issue], None, str]:
        issues.append(Issue(kind, where, number, detail, "skipped"))
        return issues, None, ""

    try:
        line = parse_line(raw)
    except LabelLineError as exc:
        return fail(exc.kind, exc.detail)
    if line.polygon_points:
        issues.append(
            Issue(
                "bad_columns",
                where,
                number,
                f"segment polygon of {line.polygon_points} points converted to its box",
                "repaired",
            )
        )
    if not line.class_in(nc):
        return fail("class_out_of_range", f"class {raw.split()[0]} not an integer in 0..{nc - 1}")
    cls, (cx, cy, w, h) = int(line.cls), line.box
    if w < _MIN_SIDE or h < _MIN_SIDE:
        return fail("zero_area", f"degenerate box w={w:g} h={h:g}")
    box = (cls, cx, cy, w, h)
    if not _inside(cx, cy, w, h):
        clipped = _clip(cx, cy, w, h)
        if clipped is None:
            return fail("out_of_bounds", "box outside the image [0, 1] even after clipping")
        issues.append(
            Issue("out_of_bounds", where, number, "box clipped to the image [0, 1]", "repaired")
        )
        box = (cls, *clipped)
    return issues, box, format_box(*box) if issues else " ".join(raw.split())


def _inside(cx: float, cy: float, w: float, h: float) -> bool:
    lo, hi = -_TOLERANCE, 1 + _TOLERANCE
    return all(lo <= v <= hi for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))


def _clip(cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float] | None:
    """Clip a box to [0, 1]; None when what is left is degenerate."""
    x1, x2 = max(0.0, cx - w / 2), min(1.0, cx + w / 2)
    y1, y2 = max(0.0, cy - h / 2), min(1.0, cy + h / 2)
    if x2 - x1 < _MIN_SIDE or y2 - y1 < _MIN_SIDE:
        return None
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


# ---------------------------------------------------------------------------- orphans


def _orphan_labels(samples: Sequence[Sample]) -> list[Issue]:
    """Label files in the datasets' ``labels/`` folders whose image does not exist."""
    referenced = {s.label.resolve() for s in samples if s.label is not None}
    label_dirs = set()
    for s in samples:
        expected = label_path_for(s.image)
        in_layout = s.label is None or s.label == expected  # COCO caches and copies are not
        if in_layout and expected.parent != s.image.parent:
            label_dirs.add(expected.parent)
    issues = []
    for folder in sorted(label_dirs):
        stems = _image_stems(_images_dir_for(folder))
        for txt in sorted(folder.glob("*.txt")):
            if txt.name == "classes.txt" or txt.stem in stems or txt.resolve() in referenced:
                continue
            issues.append(
                Issue(
                    "orphan_label", str(txt), None, "label file without a matching image", "skipped"
                )
            )
    return issues


def _images_dir_for(labels_dir: Path) -> Path:
    sa, sb = f"{os.sep}labels{os.sep}", f"{os.sep}images{os.sep}"
    head, _, tail = f"{labels_dir}{os.sep}".rpartition(sa)
    return Path(f"{head}{sb}{tail}")


def _image_stems(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.iterdir() if is_image(p)}
