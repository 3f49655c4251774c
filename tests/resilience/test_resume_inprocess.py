"""A server killed mid-run and resumed ends where an uninterrupted run ends.

Same seed, same rounds: the uninterrupted run and the killed-and-resumed one must produce the
same global model, bit for bit, with FedAdam (whose moments are strategy state that a resume
must restore) and the same round records; nothing lost, nothing counted twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from inprocess import InProcessGrid, ServerKilled, resume_inprocess, run_inprocess

from fl_server.config import ConfigError, compose
from fl_server.run_dir import RunDir, append_jsonl, read_jsonl

CFG = ["federation.rounds=3", "strategy=fedadam", "strategy.eta=0.01"]


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    ref, _ = run_inprocess(tmp_path / "a", CFG, clients=2, name="ref")
    expected = [r["global_sha256"] for r in ref.rounds()]

    # the kill comes when round 3's training starts; without the overlap round 2 is finished
    # by then (with it, tests/resilience/test_overlap_inprocess.py)
    grid = InProcessGrid(2, kill_at=3)
    with pytest.raises(ServerKilled):
        killed = [*CFG, "federation.overlap_eval=false"]
        run_inprocess(tmp_path / "b", killed, clients=2, grid=grid, name="killed")
    run = ref.__class__(tmp_path / "b" / "runs" / "killed")
    assert [r["round"] for r in run.rounds()] == [1, 2]
    # As if the kill came after round 3's line was written but before its state was saved:
    append_jsonl(run.metrics, {**run.rounds()[-1], "round": 3})

    # Restarted clients: fresh Flower contexts, as after a real restart.
    resume_inprocess(run, InProcessGrid(2))
    rounds = run.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["global_sha256"] for r in rounds] == expected
    assert [r["map50_95"] for r in rounds] == [r["map50_95"] for r in ref.rounds()]
    (resume,) = [e for e in read_jsonl(run.events) if e["kind"] == "resume"]
    assert resume["from_round"] == 3 and resume["discarded_round_records"] == 1
    assert resume["strategy_state"] == "restored"
    summary = json.loads(run.summary.read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert summary["best"] == json.loads(ref.summary.read_text())["best"]


def test_resume_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        compose([f"resume={tmp_path}"])
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="no server_state.npz"):
        compose([f"resume={tmp_path}"])


def test_resume_can_extend_a_run_but_not_change_its_training(tmp_path):
    """... and a run directory written before the cost fields (``aggregate_seconds``,
    ``server_rss_mb``, the clients' ``rss_mb``) resumes: its old lines stay as they were."""
    run, _ = run_inprocess(tmp_path, ["federation.rounds=1"], clients=2)
    with pytest.raises(ConfigError, match="cannot change when resuming"):
        compose([f"resume={run.path}", "train.lr0=0.1"])
    (old,) = run.rounds()
    new = ("aggregate_seconds", "server_rss_mb")
    old = {k: v for k, v in old.items() if k not in new}
    old["clients"] = [{k: v for k, v in c.items() if k != "rss_mb"} for c in old["clients"]]
    run.rewrite_rounds([old])
    resume_inprocess(run, InProcessGrid(2), ["federation.rounds=2"])
    first, second = run.rounds()
    assert [first["round"], second["round"]] == [1, 2] and first == old
    assert all(k in second for k in new) and all("rss_mb" in c for c in second["clients"])
    assert json.loads(run.summary.read_text())["status"] == "completed"


def test_a_strategy_holding_code_and_objects_resumes_with_its_data(tmp_path):
    from fl_server import plugins

    plugin = ["strategy=custom", "strategy._target_=unpicklable_plugin.LambdaFedAvg"]
    with plugins.trusting(["unpicklable_plugin:LambdaFedAvg"]):  # --trust-plugin, both times
        run, _ = run_inprocess(tmp_path, [*plugin, "federation.rounds=1"], clients=2)
    with pytest.raises(ConfigError, match="--trust-plugin unpicklable_plugin:LambdaFedAvg"):
        resume_inprocess(run, InProcessGrid(2), ["federation.rounds=2"])  # not granted again
    with plugins.trusting(["unpicklable_plugin:LambdaFedAvg"]):
        resume_inprocess(run, InProcessGrid(2), ["federation.rounds=2"])
    assert [r["round"] for r in run.rounds()] == [1, 2]
    (resume,) = [e for e in read_jsonl(run.events) if e["kind"] == "resume"]
    # the lambda is configuration (rebuilt from the config); the RNG is named, not saved
    assert resume["strategy_state"] == "restored except strategy.rng (not data)"


def test_lines_a_kill_cut_short_are_removed_and_said_before_the_resume_appends(
    tmp_path, monkeypatch
):
    import zipfile

    from fl_server import tracking

    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
    monkeypatch.delenv("CLEARML_API_HOST", raising=False)
    cfg = ["federation.rounds=2", "federation.overlap_eval=false", "tracking.enabled=true"]
    with pytest.raises(ServerKilled):  # when round 2's training starts
        run_inprocess(tmp_path, cfg, clients=2, grid=InProcessGrid(2, kill_at=2), name="torn")
    run = RunDir(tmp_path / "runs" / "torn")
    (session,) = tracking.sessions(run)
    folder = Path(session["folder"])
    # in this process the session was closed into its zip; a killed process leaves its folder
    with zipfile.ZipFile(f"{folder}.zip") as z:
        z.extractall(folder)
    Path(f"{folder}.zip").unlink()
    scalars = folder / "metrics.jsonl"
    assert 1 in tracking.offline_scalars(run)[("mAP", "mAP50-95")]
    # the kill came in the middle of three appends: a round's line, an event, a ClearML batch
    torn = {
        run.metrics: b'{"round": 2, "map50_95": 0.1',
        run.events: b'{"round": 2, "kind": "rollb',
        scalars: b'[{"type": "training_stats_scalar", "metric": "mAP", "iter": 2, "va',
    }
    for path, tail in torn.items():
        path.write_bytes(path.read_bytes() + tail)
    assert [r["round"] for r in run.rounds()] == [1]  # readers leave the torn line out

    resume_inprocess(run, InProcessGrid(2))
    rounds = run.rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    (resume,) = [e for e in read_jsonl(run.events) if e["kind"] == "resume"]
    assert resume["torn_lines_removed"] == {
        "metrics.jsonl": len(torn[run.metrics]),
        "events.jsonl": len(torn[run.events]),
        str(scalars.relative_to(run.path)): len(torn[scalars]),
    }
    assert tracking.offline_scalars(run)[("mAP", "mAP50-95")] == {
        r["round"]: r["map50_95"] for r in rounds
    }
    assert json.loads(run.summary.read_text())["status"] == "completed"
    # a damaged line that is not the last: named before anything starts
    run.events.write_text("{damaged\n" + run.events.read_text())
    with pytest.raises(ConfigError, match=r"resume=.*events.jsonl: line 1 is not JSON"):
        compose([f"resume={run.path}", "federation.rounds=3"])


def _holder(run: RunDir, name: str) -> subprocess.Popen:
    """Another process holding ``name`` of ``run`` until it is killed."""
    hold = f"from fl_server.run_dir import RunDir\nwith RunDir({str(run.path)!r}).held({name!r}):\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", hold + "    print('held', flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_run_under_way_is_neither_resumed_nor_replaced_by_another_process(tmp_path):
    from inprocess import tiny_config

    from fl_server import api
    from fl_server.prepare import prepare_run
    from fl_server.run_dir import RunInUse
    from fl_server.server_app import serve

    def probe(reply):  # mid-round: this server holds the run against any other
        other = subprocess.run(
            [sys.executable, "-c", f"from fl_server.run_dir import RunDir\n"
             f"with RunDir({str(run.path)!r}).held(RunDir.SERVER_LOCK): pass"],
            capture_output=True, text=True,
        )  # fmt: skip
        held_mid_round.append(
            f"in use by another fedyolo process (pid {os.getpid()}" in other.stderr
        )
        return reply

    held_mid_round: list[bool] = []
    run = RunDir(tmp_path / "runs" / "t")
    run_inprocess(tmp_path, ["federation.rounds=1"], clients=2, tamper={1: probe})
    assert held_mid_round == [True]
    before = {p: p.read_bytes() for p in (run.metrics, run.events, run.summary)}
    for name in (RunDir.LOCK, RunDir.SERVER_LOCK):  # a fedyolo process; a server it left
        holder = _holder(run, name)
        try:
            said = rf"{run.path} is in use by another fedyolo process \(pid {holder.pid}"
            with pytest.raises(RunInUse, match=said):
                api.run([f"resume={run.path}", "federation.rounds=2"])
            if name == RunDir.LOCK:
                with pytest.raises(RunInUse, match=said):
                    prepare_run(tiny_config(tmp_path, ["output.overwrite=true"], clients=2))
            else:  # a second server of the run writes nothing
                serve(InProcessGrid(2), run.path)
            assert {p: p.read_bytes() for p in before} == before and run.state.exists()
        finally:
            holder.kill()  # however it ends, the kernel lets go of the run
            holder.wait()
    with run.held(), run.held(RunDir.SERVER_LOCK):
        pass
