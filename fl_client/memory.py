"""A process's own peak resident memory (light: the edge bench's measuring child imports it)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's own peak resident memory so far, in MiB.

    Linux's ``ru_maxrss`` is not that for a child process: it keeps the high-water mark of the
    memory the child was forked with, i.e. its parent's size at that moment, across ``exec`` (a
    bench child or a warm worker started by a grown parent reported the parent's size).
    ``VmHWM`` is the peak of the process's own address space, which ``exec`` starts afresh.
    Elsewhere ``ru_maxrss`` is the best there is (KiB on Linux, bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)
