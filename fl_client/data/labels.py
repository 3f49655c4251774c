"""The one parser of YOLO label lines: ``cls cx cy w h`` or a segment polygon.

Every reader of label files (the dataset check, the partitioner, the client's drift
statistics, fault injection) goes through :func:`parse_line`, so "what is a valid line"
is decided here once. Range checks that need the class count or the image (class id
in range, box inside the image) stay with the caller that knows them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class LabelLineError(ValueError):
    """A label line that is not a box: ``kind`` is an issue kind of ``fl_server.data.check``."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class LabelLine:
    """One parsed line: the class id as written (a float) and its normalised box.

    ``polygon_points`` is the number of points of a segment polygon converted to its
    bounding box, 0 for a plain box line.
    """

    cls: float
    cx: float
    cy: float
    w: float
    h: float
    polygon_points: int = 0

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.cx, self.cy, self.w, self.h

    def class_in(self, nc: int) -> bool:
        """The class is an integer id in ``0..nc-1``."""
        return self.cls == int(self.cls) and 0 <= self.cls < nc

    def format(self, cls: int | None = None) -> str:
        """The line as YOLO text (6 decimals), optionally with another class id."""
        c = int(self.cls) if cls is None else cls
        return format_box(c, self.cx, self.cy, self.w, self.h)


def format_box(cls: int, cx: float, cy: float, w: float, h: float) -> str:
    return f"{int(cls)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def parse_line(text: str) -> LabelLine:
    """Parse one non-empty label line; raise :class:`LabelLineError` naming what is wrong."""
    parts = text.split()
    polygon = len(parts) >= 7 and len(parts) % 2 == 1
    if len(parts) != 5 and not polygon:
        raise LabelLineError("bad_columns", f"{len(parts)} columns, expected 5 (cls cx cy w h)")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise LabelLineError("bad_value", "non-numeric or non-finite value")
    if not polygon:
        return LabelLine(*values)
    xs, ys = values[1::2], values[2::2]
    x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
    return LabelLine(
        values[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, polygon_points=len(xs)
    )


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of every non-blank line of a label file's text."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield number, line


def read_lines(path: Path) -> Iterator[LabelLine | LabelLineError]:
    """Each non-blank line of a label file parsed, or the error that line raised.

    A missing file is an image without objects (nothing yielded); an unreadable one
    raises ``OSError``/``UnicodeDecodeError`` for the caller to count.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    for _, line in numbered_lines(text):
        try:
            yield parse_line(line)
        except LabelLineError as exc:
            yield exc
