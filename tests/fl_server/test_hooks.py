"""Round hooks: the loop calls them after every round; one can stop the run cleanly."""

from __future__ import annotations

import json

import pytest

from fl_server.hooks import CallerBridge, Watcher, call_on_round


class Recorder:
    """A hook by import path (``hooks=[test_hooks:Recorder]``): built with the RunDir."""

    instances: list[Recorder] = []

    def __init__(self, run):
        self.run, self.rounds, self.summary = run, [], None
        Recorder.instances.append(self)

    def on_round(self, record):
        self.rounds.append(record["round"])
        return "stopped" if record["round"] == 2 else None

    def on_end(self, summary):
        self.summary = summary


def test_bridge_and_watcher_hand_each_round_to_the_caller(tmp_path):
    seen = []

    def callback(record):
        seen.append(record["round"])
        return "pruned" if record["round"] == 2 else None

    class Hook:
        on_round = staticmethod(callback)

    with Watcher(tmp_path, [Hook()], timeout=5):
        bridge = CallerBridge.if_requested(tmp_path)
        assert bridge is not None
        assert bridge.on_round({"round": 1, "map50_95": 0.1}) is None
        assert bridge.on_round({"round": 2, "map50_95": 0.2}) == "pruned"
    assert seen == [1, 2]
    assert CallerBridge.if_requested(tmp_path) is None  # the caller is gone: no waiting
    assert not list((tmp_path / "control").glob("*.json"))


def test_a_caller_that_never_answers_costs_the_timeout_not_the_run(tmp_path):
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "caller.json").write_text(json.dumps({"timeout": 0.3}))
    bridge = CallerBridge.if_requested(tmp_path)
    assert bridge.on_round({"round": 1}) is None


def test_a_callback_that_raises_stops_the_run_and_reaches_the_caller(tmp_path):
    def bad(record):
        raise ZeroDivisionError("in my callback")

    class Hook:
        on_round = staticmethod(bad)

    with Watcher(tmp_path, [Hook()], timeout=5) as w:
        assert CallerBridge.if_requested(tmp_path).on_round({"round": 1}) == "stopped"
    assert isinstance(w.error, ZeroDivisionError)


def test_an_unknown_stop_status_is_a_bug_named_in_one_line():
    class Hook:
        def on_round(self, record):
            return "finished"

    with pytest.raises(ValueError, match="Hook asked to stop with status 'finished'"):
        call_on_round([Hook()], {"round": 1})


def test_hooks_stop_a_real_round_loop_and_the_run_directory_is_complete(tmp_path):
    """The real ServerApp loop and ClientApp in process: a config hook stops after round 2,
    a caller callback sees every round; the summary says ``stopped``, all files are there."""
    from inprocess import InProcessGrid, tiny_config

    from fl_server.prepare import prepare_run
    from fl_server.run_dir import read_jsonl
    from fl_server.server_app import serve

    Recorder.instances.clear()
    seen = []

    class Caller:
        def on_round(self, record):
            seen.append(record["round"])

    # as fl_server.run does it: prepare the run directory, then watch it for the caller
    from fl_server import plugins

    with plugins.trusting(["test_hooks:Recorder"]):  # fedyolo run --trust-plugin test_hooks:...
        cfg = tiny_config(tmp_path, ["federation.rounds=3", "hooks=[test_hooks:Recorder]"], 2)
    run = prepare_run(cfg)
    with Watcher(run.path, [Caller()]):  # the ServerApp honours the grant its config.yaml carries
        serve(InProcessGrid(2, None), run.path)
    (hook,) = Recorder.instances
    assert hook.rounds == [1, 2] and seen == [1, 2]
    assert hook.summary["status"] == "stopped" and hook.summary["rounds_completed"] == 2
    summary = json.loads(run.summary.read_text())
    assert summary["status"] == "stopped" and summary["rounds_completed"] == 2
    assert [e["kind"] for e in read_jsonl(run.events)][-2:] == ["hook_stop", "run_end"]
    assert run.summary_md.is_file() and run.best.is_file() and run.last.is_file()


def test_a_killed_callers_marker_is_forgotten_by_the_next_run(tmp_path):
    """A caller SIGKILLed mid-run leaves control/caller.json; fl_server.run without callbacks
    removes it, or the ServerApp would wait callback_timeout for every round."""
    w = Watcher(tmp_path, [], timeout=5)  # __exit__ never runs: as after a kill
    assert CallerBridge.if_requested(tmp_path) is not None
    Watcher.forget(tmp_path)
    assert CallerBridge.if_requested(tmp_path) is None
    del w
