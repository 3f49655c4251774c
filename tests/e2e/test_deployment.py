"""The same tiny federation in Flower's deployment engine: real SuperLink and SuperNodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from e2e_helpers import check_run_dir, fedyolo, tiny_run_args

pytestmark = pytest.mark.e2e


def flower_processes(run: Path) -> list[psutil.Process]:
    """Flower processes started for this run (they carry FLWR_HOME=<run>/.flwr)."""
    home = str(run / ".flwr")
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("FLWR_HOME") == home:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_deployment_run_completes_and_leaves_no_process(tmp_path):
    run = tmp_path / "runs" / "dep"
    # FedAdam on the server, 8-bit updates with error feedback from separate client processes
    args = tiny_run_args(
        tmp_path, "dep", "engine=local-deployment", "strategy=fedadam", "transport=q8"
    )
    proc = fedyolo(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = check_run_dir(run, rounds=2, clients=2, kept_state=True)
    for r in rounds:
        assert all(c["bytes_up"] < 0.3 * c["bytes_down"] for c in r["clients"])
    # Each SuperNode trained its own shard: the two clients are the two partitions.
    import json

    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert sorted(c["id"] for c in first["clients"]) == [0, 1]
    assert (run / "logs" / "superlink.log").exists()
    assert flower_processes(run) == []


def test_interrupted_deployment_run_stops_every_process(tmp_path):
    run = tmp_path / "runs" / "stop"
    args = tiny_run_args(tmp_path, "stop", "federation.rounds=50", "engine=local-deployment")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_server.cli", *args],
        cwd=tmp_path,
        env={**os.environ, "YOLO_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # A shell without job control starts background jobs with SIGINT ignored, and Python
        # keeps an inherited SIG_IGN: give the child Ctrl-C back, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        # Wait until the federation is really running (round 1 finished).
        while time.monotonic() < deadline:
            if (run / "metrics.jsonl").exists():
                break
            assert proc.poll() is None, "fedyolo exited before the first round"
            time.sleep(1)
        else:
            pytest.fail("round 1 did not finish in time")
        assert flower_processes(run), "expected live Flower processes mid-run"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    assert flower_processes(run) == []
