"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    import psutil

    return (
        f"{platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, CPU only, "
        f"Python {platform.python_version()}"
    )


def fedyolo_run(name: str, overrides: list[str]) -> Path:
    """Run the real ``fedyolo run`` into ``benchmarks/work/runs/<name>``; return the run dir."""
    cmd = [
        sys.executable,
        "-m",
        "fl_server.cli",
        "run",
        f"name={name}",
        f"output.dir={WORK / 'runs'}",
        "output.overwrite=true",
        *overrides,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "YOLO_OFFLINE": "1"})
    return WORK / "runs" / name
