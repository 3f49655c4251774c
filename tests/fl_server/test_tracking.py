"""ClearML tracking with the real SDK in offline mode (no server here): what the session holds."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from fl_server import tracking
from fl_server.config import compose
from fl_server.run_dir import RunDir, RunInUse, read_jsonl

RECORD = {
    "round": 1,
    "map50": 0.31,
    "map50_95": 0.138,
    "precision": 0.59,
    "recall": 0.29,
    "per_class": {
        "car": {"map50": 0.78, "map50_95": 0.40},
        "cyclist": {"map50": 0.2, "map50_95": 0.1},
    },
    "round_seconds": 16.2,
    "aggregate_seconds": 0.04,
    "server_rss_mb": 1210.5,
    "failures": 0,
    "lr0": 0.02,
    "guard": {"decision": "accept", "drop": -0.15, "rolled_back": False},
    "clients": [
        {
            "id": 0,
            "num_examples": 245,
            "bytes_up": 12133806,
            "loss": 5.01,
            "drift_score": 0.03,
            "rss_mb": 850.0,
        },
        {"id": 1, "num_examples": 200, "bytes_up": 12133806, "loss": float("nan")},
    ],
}


@pytest.fixture
def run(tmp_path, monkeypatch) -> RunDir:
    # Nothing outside tmp_path: ClearML's cache, and no server configured by the environment.
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLEARML_API_HOST", raising=False)
    monkeypatch.delenv("CLEARML_CONFIG_FILE", raising=False)
    r = RunDir(tmp_path / "runs" / "t")
    r.path.mkdir(parents=True)
    return r


def cfg(*overrides: str):
    return compose(["name=t", *overrides])


def test_offline_session_holds_every_round_client_and_event(run):
    t = tracking.Tracker.start(cfg(), run)
    assert t.mode == "offline" and t.task_id.startswith("offline-")
    for rnd, value in ((1, 0.10), (2, 0.20), (3, 0.0)):
        t.report_round({**RECORD, "round": rnd, "map50_95": value})
    t.report_event(3, "rollback", {"reason": "mAP50-95 dropped", "drop": 1.0, "culprits": ["1"]})
    run.best.write_bytes(b"checkpoint")
    line = t.finish(
        {
            "status": "completed",
            "best": {"map50_95": 0.2},
            "final": {"map50_95": 0.2},
            "best_checkpoint": str(run.best),
        }
    )
    assert f"fedyolo clearml-import {run.path}" in line

    scalars = tracking.offline_scalars(run)  # parsed from the session's metrics.jsonl
    assert scalars[("mAP", "mAP50-95")] == {1: 0.10, 2: 0.20, 3: 0.0}
    assert scalars[("client examples", "client 1")] == {1: 200.0, 2: 200.0, 3: 200.0}
    assert ("client loss", "client 1") not in scalars  # NaN is not reported
    assert scalars[("per-class mAP50-95", "car")][2] == 0.40
    assert scalars[("events", "rollback")] == {3: 1.0}
    assert scalars[("guard", "rolled back")] == {1: 0.0, 2: 0.0, 3: 0.0}
    assert scalars[("round", "server RSS MB")][3] == 1210.5  # the cost fields, where sent
    assert scalars[("round", "aggregate seconds")][1] == 0.04
    assert scalars[("client RSS MB", "client 0")][2] == 850.0
    assert ("client RSS MB", "client 1") not in scalars  # a client that sent none
    (session,) = tracking.sessions(run)
    assert not Path(session["folder"]).exists()  # one copy of the session: its zip
    with zipfile.ZipFile(session["folder"] + ".zip") as z:
        names = z.namelist()
        task = json.loads(z.read("task.json"))
    assert any(n.endswith("artifacts/best.pt/best.pt") for n in names)
    assert "rollback" in task["tags"] and "fedavg" in task["tags"]
    assert task["hyperparams"]["fedyolo"]["federation/clients"]["value"] == "2"


def test_tracker_errors_never_reach_the_run(run, monkeypatch):
    t = tracking.Tracker.start(cfg(), run)

    def broken(*a, **k):
        raise ConnectionError("server went away")

    monkeypatch.setattr(t.task.get_logger(), "report_scalar", broken)
    t.report_round(RECORD)  # does not raise
    (err,) = [e for e in read_jsonl(run.events) if e["kind"] == "tracker_error"]
    assert err["method"] == "report_round" and "server went away" in err["error"]
    t.finish({"status": "completed", "best": None, "final": None, "best_checkpoint": None})


def test_start_failure_means_no_tracking_not_no_run(run, monkeypatch):
    import clearml

    def refuse(*a, **k):
        raise RuntimeError("no credentials")

    monkeypatch.setattr(clearml.Task, "init", refuse)
    t = tracking.Tracker.start(cfg(), run)
    assert t.task is None and t.task_id is None
    t.report_round(RECORD)
    assert t.finish({"status": "completed"}) is None
    assert [e["method"] for e in read_jsonl(run.events)] == ["start"]


def test_disabled(run):
    t = tracking.Tracker.start(cfg("tracking.enabled=false"), run)
    assert t.mode == "off" and t.task is None
    t.report_round(RECORD)
    assert not run.clearml.exists() and not run.events.exists()


def test_resumed_offline_run_chains_its_sessions(run):
    first = tracking.Tracker.start(cfg(), run)
    first.report_round(RECORD)
    # the server is killed here: no finish(); a restarted server resumes with the task id
    second = tracking.Tracker.start(cfg(), run, resume_task_id=first.task_id)
    second.report_round({**RECORD, "round": 2, "map50_95": 0.2})
    second.finish({"status": "completed", "best": None, "final": None, "best_checkpoint": None})
    assert [s["task_id"] for s in tracking.sessions(run)] == [first.task_id, second.task_id]
    assert tracking.offline_scalars(run)[("mAP", "mAP50-95")] == {1: 0.138, 2: 0.2}


def test_auto_mode_is_online_only_with_a_configured_server(run, monkeypatch, tmp_path):
    assert not tracking.server_configured()
    conf = tmp_path / "clearml.conf"
    conf.write_text("api {}\n")
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(conf))
    assert tracking.server_configured()
    monkeypatch.delenv("CLEARML_CONFIG_FILE")
    monkeypatch.setenv("CLEARML_API_HOST", "https://api.clear.ml")
    assert tracking.server_configured()


def test_import_of_a_killed_servers_session_drops_its_torn_line_first(run, monkeypatch):
    """No ClearML server here: ClearML's own import is replaced by one that reads the session
    as it would (its ``metrics.jsonl``, line by line). What it is handed must parse."""
    from clearml import Task

    killed = tracking.Tracker.start(cfg(), run)
    killed.report_round(RECORD)
    killed.task.flush(wait_for_uploads=True)  # then the server is killed: no finish()
    folder = Path(tracking.sessions(run)[0]["folder"])
    lines = (folder / "metrics.jsonl").read_bytes()
    (folder / "metrics.jsonl").write_bytes(lines + b'[{"type": "training_stats_scal')
    handed = []

    def import_offline_session(source, previous_task_id=None):
        handed.append([json.loads(x) for x in (Path(source) / "metrics.jsonl").open()])
        return "imported-1"

    monkeypatch.setattr(Task, "import_offline_session", import_offline_session)
    holder = run.held(RunDir.SERVER_LOCK)  # while a server writes the run: refused
    with holder, pytest.raises(RunInUse):
        tracking.import_offline(run)
    assert (folder / "metrics.jsonl").read_bytes().endswith(b"scal") and not handed
    assert tracking.import_offline(run) == "imported-1"
    assert (folder / "metrics.jsonl").read_bytes() == lines and len(handed[0]) >= 1


def test_import_needs_a_session(run):
    with pytest.raises(FileNotFoundError, match="no offline ClearML session"):
        tracking.import_offline(run)
    assert Path(run.clearml).exists() is False


@pytest.fixture
def silent_server():
    """An address that accepts connections and never answers (a hung server, a black hole)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def refusing_server():
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("server", ["refusing_server", "silent_server"])
def test_unreachable_server_costs_a_bounded_delay_then_offline(run, monkeypatch, request, server):
    import time

    host = request.getfixturevalue(server)
    monkeypatch.setenv("CLEARML_API_HOST", host)
    monkeypatch.setenv("CLEARML_WEB_HOST", host)
    monkeypatch.setenv("CLEARML_FILES_HOST", host)
    start = time.monotonic()
    t = tracking.Tracker.start(cfg("tracking.mode=online", "tracking.connect_timeout=2"), run)
    waited = time.monotonic() - start
    # ClearML's own client retried such a server for minutes (9 of 240 retries in 400 s).
    assert waited < 30, waited
    assert t.mode == "offline" and t.task_id.startswith("offline-")
    (err,) = [e for e in read_jsonl(run.events) if e["kind"] == "tracker_error"]
    assert err["method"] == "connect" and err["fallback"] == "offline" and host in err["error"]
    expected = "did not answer within 2 s" if server == "silent_server" else "unreachable"
    assert expected in err["error"]
    t.report_round(RECORD)
    line = t.finish({"status": "completed", "best": None, "final": None, "best_checkpoint": None})
    assert "fedyolo clearml-import" in line  # the session is kept for import
    assert tracking.offline_scalars(run)[("mAP", "mAP50-95")] == {1: 0.138}


def test_a_tls_server_is_reachable_even_if_its_certificate_is_not_ours(run, tmp_path, monkeypatch):
    """It answered: verifying its certificate is ClearML's business (api.verify_certificate)."""
    import socket
    import ssl
    import threading

    from deploy.certs import make_tls

    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])  # a CA this process does not trust
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert, tls.key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)

    def serve():
        conn, _ = sock.accept()
        try:
            ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()  # the client refused our certificate: it reached us

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("CLEARML_API_HOST", f"https://127.0.0.1:{sock.getsockname()[1]}")
    try:
        assert tracking.unreachable(5.0) is None
    finally:
        sock.close()


def test_a_broken_clearml_configuration_means_no_tracking_not_no_run(run, monkeypatch):
    def broken(timeout):
        raise ValueError("clearml.conf: cannot parse line 3")

    monkeypatch.setattr(tracking, "unreachable", broken)
    t = tracking.Tracker.start(cfg("tracking.mode=online"), run)
    assert t.task is None
    (err,) = read_jsonl(run.events)
    assert err["method"] == "start" and "cannot parse line 3" in err["error"]


def test_task_init_registers_no_fork_hook(tmp_path):
    """``Task.init`` registers ClearML's at-fork hooks part-way through and goes on for a
    while; the simulation engine starts Ray (which forks) while the ServerApp's thread runs it,
    and a child forked in that window hung in the hook on an import lock. In a fresh process,
    opening fedyolo's task registers no ClearML fork hook at all."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        hooks = []
        real = os.register_at_fork
        def spy(**kw):
            hooks.extend(getattr(f, "__qualname__", repr(f)) for f in kw.values())
            return real(**kw)
        os.register_at_fork = spy
        from fl_server import tracking
        from fl_server.run_dir import RunDir
        run = RunDir(Path(sys.argv[1]))
        run.path.mkdir(parents=True)
        task = tracking.open_task(run, "offline", "fedyolo-test", "fork-hooks")
        task.close()
        print("HOOKS", [h for h in hooks if "PatchOsFork" in h])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        # not what earlier tests left in this process's environment (ClearML's variables)
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("CLEARML", "TRAINS"))},
            "CLEARML_CACHE_DIR": str(tmp_path / "cache"),
        },
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HOOKS []" in done.stdout, done.stdout[-2000:]
