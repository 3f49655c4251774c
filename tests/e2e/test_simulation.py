"""A tiny federation in Flower's simulation engine, end to end."""

from __future__ import annotations

import json

import pytest
from e2e_helpers import check_best_reevaluates, check_run_dir, fedyolo, tiny_run_args

pytestmark = pytest.mark.e2e


def test_simulation_run_writes_a_complete_run_directory(tmp_path):
    # FedBN and fp16 updates: each client keeps its BatchNorm and residual across rounds.
    args = tiny_run_args(
        tmp_path, "sim", "federation.fraction_evaluate=1.0", "strategy=fedbn", "transport=fp16"
    )
    proc = fedyolo(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "sim"
    rounds = check_run_dir(run, rounds=2, clients=2, kept_state=True)
    for r in rounds:  # fp16 updates: half the bytes of the fp32 global model sent down
        assert all(c["bytes_up"] < 0.51 * c["bytes_down"] for c in r["clients"])
    # Each client also evaluated the global model on its own local validation split.
    for r in rounds:
        assert sorted(c["id"] for c in r["client_eval"]) == [0, 1]
        assert all(0.0 <= c["map50_95"] <= 1.0 and c["num_examples"] > 0 for c in r["client_eval"])

    # ClearML, offline: the session in the run directory holds every round (parsed, not assumed)
    from fl_server.run_dir import RunDir
    from fl_server.tracking import offline_scalars, sessions

    scalars = offline_scalars(RunDir(run))
    assert scalars[("mAP", "mAP50-95")] == {r["round"]: r["map50_95"] for r in rounds}
    assert set(scalars[("client bytes up", "client 1")]) == {1, 2}
    assert len(sessions(RunDir(run))) == 1  # one task: the server's

    check_best_reevaluates(run, tmp_path / "val")


def test_ctrl_c_stops_the_simulation_within_seconds_and_the_run_resumes(tmp_path):
    import os
    import signal
    import subprocess

    from e2e_helpers import check_interrupted, start_fedyolo
    from test_resilience import wait_for_rounds

    from fl_server.run_dir import read_jsonl

    run = tmp_path / "runs" / "intr"
    args = tiny_run_args(tmp_path, "intr", "federation.rounds=3", "federation.round_timeout=900")
    proc = start_fedyolo(args, tmp_path, ctrl_c=True, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rounds(run, 1, proc)
        # a terminal's Ctrl-C reaches the whole process group: the driver, Ray and its workers
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)  # the round timeout is 900 s: not waited out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    check_interrupted(run)

    resumed = fedyolo(["run", f"resume={run}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["round"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
