"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"


def repo_path(path: Path) -> str:
    """``path`` as the repository names it (``benchmarks/work/runs/...``), also where
    ``benchmarks/work`` is a link to another checkout's (a benchmark worktree)."""
    for base, name in ((WORK.resolve(), "benchmarks/work"), (ROOT, "")):
        if path.resolve().is_relative_to(base):
            rel = path.resolve().relative_to(base)
            return str(Path(name) / rel) if name else str(rel)
    return str(path)


def machine() -> str:
    """The machine a result was measured on, its CPU named: machines of the same size differ
    (an Intel Xeon with AMX and AVX-512 VNNI, an AMD EPYC with AVX2 only: training ran ~2.5x
    slower on the second, and INT8 and bf16 kernels depend on those instructions)."""
    import psutil

    return (
        f"{platform.machine()}, {cpu_name()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, CPU only, "
        f"Python {platform.python_version()}"
    )


def cpu_name() -> str:
    """The CPU's model name and the vector instructions that decide its kernels (Linux's
    /proc/cpuinfo), e.g. ``AMD EPYC (avx2)``; ``unknown CPU`` elsewhere."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), ""
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    return f"{model or 'unknown CPU'} ({', '.join(have) or 'no AVX2'})"


def code_commit() -> str | None:
    """The commit the benchmark's code is at ("+dirty" with uncommitted changes to tracked
    files), or None outside a git checkout: what "the same code" means between two results."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# The local work per round that every benchmark recorded before 2026-12-05 ran with: the defaults
# then (1 local epoch of batch 16 at a constant lr0 0.02; today's defaults are in
# configs/train/default.yaml, chosen by benchmarks/tuning.py --rerun, results/tuning_defaults.json
# and tuning_schedule.json). Benchmark runs keep it so
# each recorded figure reproduces with its command; a benchmark's own overrides come after it and
# win (--local-epochs). tuning.py compares the defaults themselves and passes pin_train=False.
MEASURED_TRAIN = [
    "train.epochs=1",
    "train.batch=16",
    "train.lr0=0.02",
    "train.lr_schedule=constant",
]


def run_overrides(name: str, overrides: list[str], pin_train: bool = True) -> list[str]:
    """The overrides of benchmark run ``benchmarks/work/runs/<name>``."""
    return [
        f"name={name}",
        f"output.dir={WORK / 'runs'}",
        "output.overwrite=true",
        *(MEASURED_TRAIN if pin_train else []),
        *overrides,
    ]


def study_base(args) -> list[str]:
    """The base of the tuning benchmarks' federations (tuning.py, pruning.py): the built-in
    fleet's domain split, ``--clients`` and ``--rounds``, no ClearML, then ``--extra``."""
    return [
        "data.partition=domain",
        f"federation.clients={args.clients}",
        f"federation.rounds={args.rounds}",
        "tracking.enabled=false",
        *args.extra.split(),
    ]


def fedyolo_cmd(name: str, overrides: list[str]) -> list[str]:
    """The ``fedyolo run`` command line of a benchmark run (for runs a benchmark kills)."""
    return [sys.executable, "-m", "fl_server.cli", "run", *run_overrides(name, overrides)]


def fedyolo_run(name: str, overrides: list[str], pin_train: bool = True) -> Path:
    """Run a federation through the library API into ``benchmarks/work/runs/<name>``."""
    from fl_server import run

    summary = run(run_overrides(name, overrides, pin_train))
    if not summary.ok:
        raise RuntimeError(f"benchmark run {name} ended with status {summary.status}")
    return summary.run_dir


def federation_args(description: str):
    """The argument parser shared by the federation benchmarks (same budget flags)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=2)
    return ap


def new_result(name: str, args, **setup) -> dict:
    """The JSON skeleton every federation benchmark writes: machine, date, setup, rows."""
    import time

    from fl_server.config import compose

    cfg = compose(MEASURED_TRAIN)  # what the runs do not override: configs/ or MEASURED_TRAIN
    return {
        "benchmark": name,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "setup": {
            "model": str(cfg.model.cfg),
            "clients": args.clients,
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "images": int(cfg.data.synth.images),
            "imgsz": int(cfg.data.synth.imgsz),
            **setup,
        },
        "rows": [],
    }
