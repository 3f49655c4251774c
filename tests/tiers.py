"""``make test``: the in-process tier and the end-to-end tier, side by side.

The end-to-end tier (``-m e2e``: federations through the command line, the container images, the
EC2 rehearsal, the arm64 smoke test) spends much of its time waiting on one core: Docker
compressing an image for the registry, debootstrap, qemu, containers starting. The in-process
tier (``-m "not e2e"``) is CPU-bound. Run one after the other they took 67 min on a 2-core AMD
EPYC (2026-12-05); side by side the idle core does the other tier's work. Each tier is its own
pytest session (its own fixtures, its own temporary folders) and prints its own summary and
slowest tests; every line is prefixed with its tier's name.

    python tests/tiers.py [PYTEST ARGS...]     # both tiers, side by side
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
TIERS = {"e2e": "e2e", "in-process": "not e2e"}  # name: marker expression
NO_TESTS = 5  # pytest.ExitCode.NO_TESTS_COLLECTED


def _command(marker: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "--durations=30", "-m", marker, *extra]


def _stream(name: str, proc: subprocess.Popen, lock: threading.Lock) -> None:
    width = max(map(len, TIERS))
    assert proc.stdout is not None
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"[{name:>{width}}] {line}")
            sys.stdout.flush()


def run(extra: list[str], serial: bool) -> dict[str, tuple[int, float]]:
    """Each tier's exit status and seconds."""
    lock = threading.Lock()
    results: dict[str, tuple[int, float]] = {}

    def start(name: str) -> tuple[subprocess.Popen, threading.Thread, float]:
        proc = subprocess.Popen(
            _command(TIERS[name], extra),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        reader = threading.Thread(target=_stream, args=(name, proc, lock), daemon=True)
        reader.start()
        return proc, reader, time.monotonic()

    def finish(name: str, proc: subprocess.Popen, reader: threading.Thread, t0: float) -> None:
        rc = proc.wait()
        reader.join()
        results[name] = (rc, time.monotonic() - t0)

    if serial:
        for name in TIERS:
            finish(name, *start(name))
        return results
    started = {name: start(name) for name in TIERS}  # the longer tier (e2e) first
    try:
        for name, (proc, reader, t0) in started.items():
            finish(name, proc, reader, t0)
    except KeyboardInterrupt:  # Ctrl-C reaches both pytest sessions (one process group)
        for proc, _, _ in started.values():
            proc.wait()
        raise
    return results


def main(argv: list[str]) -> int:
    serial = os.environ.get("FEDYOLO_TEST_SERIAL") == "1"
    results = run(argv, serial)
    # the whole suite: each tier must collect tests; narrowed by arguments (a path, -k), a tier
    # may select none, but not both
    empty_fails = not argv or all(rc == NO_TESTS for rc, _ in results.values())
    failed = False
    for name, (rc, seconds) in results.items():
        if rc == 0:
            verdict = "passed"
        elif rc == NO_TESTS:
            verdict = "collected no tests" + (": a failure" if empty_fails else "")
        else:
            verdict = f"FAILED (pytest exit status {rc})"
        failed |= rc != 0 and (rc != NO_TESTS or empty_fails)
        print(f"tier {name} (-m {TIERS[name]!r}): {verdict} in {seconds / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
