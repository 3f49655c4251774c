"""``fl_server.run`` from a user's script, in both engines: a callback stops the run after
round 1 of 3 and the run directory is complete, with status ``pruned``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import TINY

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("engine", ["simulation", "local-deployment"])
def test_a_callback_stops_the_run_after_round_one(tmp_path, engine):
    overrides = [
        *TINY,
        "federation.rounds=3",
        f"engine={engine}",
        "name=api",
        f"output.dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(
        [sys.executable, str(HERE / "api_caller.py"), "--stop-after", "1", *overrides],
        cwd=tmp_path,
        env={**os.environ, "YOLO_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run = Path(out["run_dir"])
    assert out["status"] == "pruned" and out["rounds_completed"] == 1
    assert out["pythonpath_kept"]
    # the callback ran in the caller's process on exactly the round the server recorded
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert out["seen"] == [{"round": 1, "map50_95": lines[0]["map50_95"]}]
    assert [r["round"] for r in lines] == [1]
    for name in ("summary.md", "metrics.png", "best.pt", "last.pt", "server_state.npz"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "pruned" and "pruned" in (run / "summary.md").read_text()
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events][-2:] == ["hook_stop", "run_end"]
    assert events[-1]["status"] == "pruned"
    assert not list((run / "control").glob("*.json"))  # no request or verdict left behind
