"""``make test``: the suite as two pytest sessions side by side.

The ``e2e`` tier (``tests/e2e/``: federations through the command line, the container images,
the EC2 rehearsal, the arm64 smoke test) spends much of its time waiting on one core: Docker
compressing an image for the registry, debootstrap, qemu, containers starting. The ``rest``
(unit tests, in-process federations, the SuperLink engine, the PostgreSQL study) is mostly
CPU-bound. One after the other they took 67 min on a 2-core AMD EPYC (2026-12-05); side by side
the idle core does the other tier's work. Each tier is its own pytest session (its own fixtures
and temporary folders); tests/conftest.py takes this file's collection hook, which keeps the
tier's tests (``FEDYOLO_TEST_TIER``: those in a folder named ``e2e``, or the others) and
deselects the rest.
Each prints its own summary and slowest tests; every line is prefixed with its tier's name, and
the last lines give both verdicts.

    python tests/tiers.py [PYTEST ARGS...]       # both tiers, side by side
    FEDYOLO_TEST_SERIAL=1 python tests/tiers.py  # one after the other (a 1-core machine)

The exit status is 0 only if both tiers passed. In the whole suite a tier that collected no test
is a failure (pytest's exit status 5), not a pass; arguments that narrow the run (a path, ``-k``)
may leave one tier empty, not both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a line per test in the e2e tier (a few dozen, minutes each); dots in the rest (hundreds)
TIERS = {"e2e": "-v", "rest": "-q"}  # the longer first
NO_TESTS = 5  # pytest.ExitCode.NO_TESTS_COLLECTED
TIER_ENV = "FEDYOLO_TEST_TIER"


def pytest_collection_modifyitems(config, items) -> None:
    """Keep the tier's tests, deselect the others' (tests/conftest.py's hook)."""
    tier = os.environ.get(TIER_ENV)
    if not tier:
        return
    if tier not in TIERS:
        raise ValueError(f"{TIER_ENV}={tier!r}: not one of {sorted(TIERS)}")
    keep, drop = [], []
    for item in items:
        path = Path(item.path)
        if path.is_relative_to(config.rootpath):
            path = path.relative_to(config.rootpath)
        (keep if ("e2e" in path.parent.parts) == (tier == "e2e") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class Tier(threading.Thread):
    """One pytest session, its lines prefixed with the tier's name; ``rc`` and ``seconds`` once
    it has ended."""

    lock = threading.Lock()

    def __init__(self, name: str, extra: list[str]) -> None:
        super().__init__(daemon=True)
        self.tier, self.extra = name, extra
        self.rc: int | None = None
        self.seconds = 0.0

    def run(self) -> None:
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", TIERS[self.tier], "--durations=30", *self.extra]
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            # not tests/ on PYTHONPATH: its folders (fl_server/, deploy/, ...) would shadow the
            # packages of the same names in the subprocesses the tests start
            env={**os.environ, "PYTHONUNBUFFERED": "1", TIER_ENV: self.tier},
        )
        width = max(map(len, TIERS))
        assert proc.stdout is not None
        for line in proc.stdout:
            with self.lock:
                sys.stdout.write(f"[{self.tier:>{width}}] {line}")
                sys.stdout.flush()
        self.rc = proc.wait()
        self.seconds = time.monotonic() - t0


def run(extra: list[str], serial: bool) -> list[Tier]:
    tiers = [Tier(name, extra) for name in TIERS]
    for tier in tiers:
        tier.start()
        if serial:
            tier.join()
    for tier in tiers:  # Ctrl-C reaches both pytest sessions (one process group)
        while tier.is_alive():
            tier.join(1.0)
    return tiers


def main(argv: list[str]) -> int:
    serial = os.environ.get("FEDYOLO_TEST_SERIAL") == "1"
    tiers = run(argv, serial)
    # the whole suite: each tier must collect tests; narrowed by arguments (a path, -k), a tier
    # may select none, but not both
    empty_fails = not argv or all(t.rc == NO_TESTS for t in tiers)
    failed = False
    for t in tiers:
        if t.rc == 0:
            verdict = "passed"
        elif t.rc == NO_TESTS:
            verdict = "collected no tests" + (": a failure" if empty_fails else "")
        else:
            verdict = f"FAILED (pytest exit status {t.rc})"
        failed |= t.rc != 0 and (t.rc != NO_TESTS or empty_fails)
        print(f"tier {t.tier}: {verdict} in {t.seconds / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
