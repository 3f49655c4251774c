"""A run tells the truth about how it ended (issue 28, item 9): a run that aggregated nothing
failed, a partly failed one counts its lost rounds, ``output.overwrite`` deletes only a fedyolo
run, and a full disk, a broken hook or an engine's error is one line with the run directory
left consistent (summary.json says ``failed`` and why; no ``.tmp`` left).

The federations are tiny and in process (``tests/inprocess.py``): two clients, 1-2 rounds.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
from inprocess import run_inprocess, tiny_config

from fl_server import api, cli, commands
from fl_server import run_dir as run_dir_mod
from fl_server.config import ConfigError
from fl_server.prepare import prepare_run

CRASH_ALL = "faults.more=[{client: [0, 1], kind: crash}]"


def _summary(run) -> dict:
    return json.loads(run.summary.read_text())


def test_a_run_in_which_every_client_failed_every_round_failed(tmp_path, monkeypatch, capsys):
    run, _ = run_inprocess(tmp_path, ["federation.rounds=2", CRASH_ALL], clients=2)
    summary = _summary(run)
    assert summary["status"] == "failed" and summary["rounds_lost"] == 2
    assert "no round aggregated a client update" in summary["reason"]
    # what `fedyolo run` says about it: one line, exit 1
    monkeypatch.setattr(api, "run", lambda cfg: api.Summary.read(run.path))
    assert commands.run_federation([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "status failed: no round aggregated" in err[0]


def test_a_partly_failed_run_says_how_many_rounds_were_lost(tmp_path, monkeypatch, capsys):
    crash_round_1 = "faults.more=[{client: [0, 1], round: 1, kind: crash}]"
    run, _ = run_inprocess(tmp_path, ["federation.rounds=2", crash_round_1], clients=2)
    summary = _summary(run)
    assert summary["status"] == "completed" and summary["rounds_lost"] == 1
    monkeypatch.setattr(api, "run", lambda cfg: api.Summary.read(run.path))
    assert commands.run_federation([]) == 0
    assert "2 rounds, 1 of them lost" in capsys.readouterr().out


def test_overwrite_deletes_only_a_fedyolo_run(tmp_path):
    cfg = tiny_config(tmp_path, ["output.overwrite=true"], clients=2)
    mine = tmp_path / "runs" / "t"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work\n")
    with pytest.raises(ConfigError, match="is not a fedyolo run .* refusing to delete it"):
        prepare_run(cfg)
    assert (mine / "thesis.tex").read_text() == "years of work\n"


def test_a_failed_atomic_write_leaves_no_tmp(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(run_dir_mod.os, "replace", full)
    with pytest.raises(OSError):
        run_dir_mod.write_json(tmp_path / "summary.json", {"status": "running"})
    assert not list(tmp_path.iterdir())


def test_a_full_disk_mid_run_fails_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    real = run_dir_mod.append_jsonl

    def full_at_round_1(path, obj):
        if path.name == "metrics.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, obj)

    monkeypatch.setattr(run_dir_mod, "append_jsonl", full_at_round_1)
    run, _ = run_inprocess(tmp_path, ["federation.rounds=1"], clients=2)
    summary = _summary(run)
    assert summary["status"] == "failed"
    assert summary["reason"].startswith("OSError: [Errno 28] No space left on device")
    assert not [p for p in run.path.rglob("*.tmp")]
    (failed,) = [e for e in run_dir_mod.read_jsonl(run.events) if e["kind"] == "run_failed"]
    assert "Traceback" in failed["traceback"]  # kept for a bug report, not shown

    # a full disk the CLI meets itself: one line naming the file, exit 2
    def full_cmd(overrides):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run.summary))

    monkeypatch.setattr(commands, "run_federation", full_cmd)
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedyolo: error: No space left on device: {run.summary}"]


class BrokenHook:
    """A config hook (``hooks=[test_run_truth:BrokenHook]``) whose on_round has a bug."""

    def __init__(self, run):
        pass

    def on_round(self, record):
        return len(None)  # TypeError


def test_a_hooks_error_fails_the_run_naming_the_hook(tmp_path):
    from fl_server import plugins

    hook = ["federation.rounds=1", "hooks=[test_run_truth:BrokenHook]"]
    with plugins.trusting(["test_run_truth:BrokenHook"]):  # --trust-plugin, as a user would
        run, _ = run_inprocess(tmp_path, hook, clients=2)
    summary = _summary(run)
    assert summary["status"] == "failed"
    assert summary["reason"].startswith("round hook BrokenHook failed in round 1: TypeError")


def test_an_engine_error_is_a_failed_run_not_a_traceback(tmp_path, monkeypatch):
    from fl_server import engines

    def broken_engine(rd, cfg):
        raise RuntimeError("An error was encountered. Ending simulation.")

    monkeypatch.setattr(engines, "get", lambda name: broken_engine)
    summary = api.run(tiny_config(tmp_path, [], clients=2))
    assert summary.status == "failed"
    assert "engine failed: An error was encountered" in summary.reason
