"""The one exception type for a user's data mistakes, and the record of one finding."""

from dataclasses import dataclass

from fl_client.errors import UserError


class DataError(UserError, ValueError):
    """A dataset, path or data parameter is wrong in a way the user can fix.

    The message is a single line naming the offending thing and what was expected,
    so command-line tools can print it instead of a traceback.
    """


@dataclass(frozen=True)
class Issue:
    """One finding: what (``kind``), where (``path``, 1-based ``line``), and what was done.

    ``count`` > 1: one record standing for that many findings of a kind in one file, the ones
    past the first few (a file of a million bad lines is a short report, its counts exact).
    """

    kind: str
    path: str
    line: int | None
    detail: str
    action: str  # skipped | repaired | kept
    count: int = 1


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (a finding or a DataError is one line)."""
    return " ".join(str(exc).split())
