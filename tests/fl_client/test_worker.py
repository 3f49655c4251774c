"""The warm worker (``fl_client.worker``): a real worker process, real train and evaluate
messages made by the server side, the same work as in-process, failures named, one process
across messages, and its lifetime tied to the process it serves."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.app import Context, RecordDict
from inprocess import tiny_config

from fl_client import spare, worker
from fl_client.client_app import STATE_KEY, handle
from fl_client.model import WEIGHTS_KEY, build_model, to_record
from fl_client.wire import RoundConfig
from fl_server.prepare import prepare_run
from fl_server.server_app import round_config


@pytest.fixture
def worker_env(tmp_path, monkeypatch):
    """A private socket folder and a stand-in for the SuperExec the worker lives for."""
    monkeypatch.setenv("FEDYOLO_WORKER_DIR", str(tmp_path / "sockets"))
    (tmp_path / "sockets").mkdir()
    superexec = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield superexec
    superexec.kill()
    superexec.wait()
    for p in _workers(tmp_path / "sockets"):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _workers(folder: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "fl_client.worker" in cmd and any(str(folder) in c for c in cmd):
            out.append(p)
    return out


def _messages(tmp_path: Path) -> tuple[RecordDict, RecordDict, dict]:
    cfg = tiny_config(tmp_path, ["federation.rounds=1"], clients=2)
    run = prepare_run(cfg)
    names = json.loads(run.manifest.read_text())["data"]["names"]
    model = build_model(str(cfg.model.cfg), names)
    config = round_config(cfg, names, run.data, model.yaml).with_round(server_round=1)
    train = RecordDict({"arrays": to_record(model), "config": config.to_record()})
    evaluate = RecordDict({"arrays": to_record(model), "config": config.to_record()})
    return train, evaluate, {"partition-id": 1, "warm-worker": True}


def _context(node: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_the_worker_does_the_same_work_keeps_serving_and_ends_with_its_superexec(
    tmp_path, worker_env
):
    train, evaluate, node = _messages(tmp_path)
    received = train["arrays"][WEIGHTS_KEY].numpy()
    ctx = _context(node)

    out = worker.call("train", train, ctx, watch=worker_env.pid)
    pids = {p.pid for p in _workers(tmp_path / "sockets")}
    assert len(pids) == 1  # started on the first message
    before = psutil.Process().memory_info().rss / 2**20
    local = handle("train", train, node, RecordDict())  # the same work in this process
    m, m_local = out["metrics"], local["metrics"]
    assert m["num-examples"] == m_local["num-examples"] > 0 and m["partition-id"] == 1
    # each reply carries the peak memory of the process that did the work, in MiB: here about
    # this process's memory before it or more, and less than the machine's (KiB or bytes: not).
    # Half, not all of it: the kernel's high-water mark (ru_maxrss) trails the current resident
    # size psutil reads by a few pages (a CI machine: 1701.78 MiB before, 1701.61 peak)
    assert before / 2 <= m_local["rss-mb"] < psutil.virtual_memory().total / 2**20
    assert 0 < m["rss-mb"] < psutil.virtual_memory().total / 2**20
    trained = out["arrays"][WEIGHTS_KEY].numpy()
    assert trained.shape == received.shape and np.isfinite(trained).all()
    assert not np.array_equal(trained, received)  # it trained
    assert STATE_KEY in ctx.state  # the client's own state came back into Flower's context

    # a failure comes back named; the worker stays and serves the next message
    bad = dict(node, **{"data-path": str(tmp_path / "nowhere" / "data.yaml")})
    with pytest.raises(worker.WorkerError, match=r"^FileNotFoundError: client data: .*nowhere"):
        worker.call("evaluate", evaluate, _context(bad), watch=worker_env.pid)
    res = worker.call("evaluate", evaluate, _context(node), watch=worker_env.pid)
    assert 0.0 <= res["metrics"]["map50-95"] <= 1.0
    assert {p.pid for p in _workers(tmp_path / "sockets")} == pids  # one process throughout

    # the SuperExec it serves ends: the worker leaves and removes its socket
    sock = worker.socket_path(worker_env.pid, 7)
    assert sock.exists()
    worker_env.kill()
    worker_env.wait()
    assert _wait(lambda: not _workers(tmp_path / "sockets"), 15)
    assert not sock.exists()


def test_a_worker_killed_mid_message_fails_that_message_only_and_a_stale_one_retires(
    tmp_path, worker_env
):
    train, evaluate, node = _messages(tmp_path)
    ctx = _context({**node, "fault-injection": True})  # this node opts in to the hang fault
    worker.call("evaluate", evaluate, ctx, watch=worker_env.pid)
    (first,) = _workers(tmp_path / "sockets")

    def kill_soon() -> None:
        time.sleep(1.0)
        first.send_signal(signal.SIGKILL)

    import threading

    # the client stalls 60 s in this message (a hang fault): it is killed inside it, for sure
    config = RoundConfig.from_record(train["config"])
    hang = json.dumps([{"client": 1, "kind": "hang", "hang_seconds": 60}])
    stalled = RecordDict(
        {"arrays": train["arrays"], "config": replace(config, faults=hang).to_record()}
    )
    threading.Thread(target=kill_soon, daemon=True).start()
    with pytest.raises(ConnectionError, match="ended mid-message"):
        worker.call("train", stalled, ctx, watch=worker_env.pid)
    out = worker.call("train", train, ctx, watch=worker_env.pid)  # a new worker serves
    assert out["metrics"]["num-examples"] > 0
    (second,) = _workers(tmp_path / "sockets")
    assert second.pid != first.pid

    # a caller of other code: the worker answers "stale" and retires
    sock = worker.socket_path(worker_env.pid, 7)
    with socket.socket(socket.AF_UNIX) as s, s.makefile("rwb") as f:
        s.connect(str(sock))
        assert s.recv(1) == worker.ACK  # the worker took the connection
        header = {"kind": "evaluate", "node": node, "code": "other"}
        for frame in (json.dumps(header).encode(), b"", b""):
            worker._send(f, frame)
        f.flush()
        assert json.loads(worker._recv(f)) == {"ok": False, "stale": True}
    assert _wait(lambda: not _workers(tmp_path / "sockets"), 15)  # (a zombie: no cmdline)


def test_a_socket_folder_others_can_write_to_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDYOLO_WORKER_DIR", str(tmp_path))
    folder = tmp_path / f"fedyolo-worker-{os.getuid()}"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    with pytest.raises(PermissionError, match="mode 0700"):
        spare.worker_dir()


def test_a_worker_gone_while_the_message_is_sent_is_the_same_one_line(tmp_path, worker_env):
    """A worker that dies before it has read the whole message breaks the pipe on the sending
    side: the same ConnectionError naming the socket as a death mid-reply (not a bare
    BrokenPipeError), whatever the machine's speed."""
    import threading

    train, _, node = _messages(tmp_path)
    path = worker.socket_path(worker_env.pid, 7)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def accept_and_die() -> None:
            conn, _ = listener.accept()
            conn.sendall(worker.ACK)  # it took the message...
            conn.recv(16)  # ...read part of the header, and is gone
            conn.close()

        threading.Thread(target=accept_and_die, daemon=True).start()
        with pytest.raises(ConnectionError, match="ended mid-message"):
            worker.call("train", train, _context(node), watch=worker_env.pid)


def test_a_connection_a_dying_worker_never_took_goes_to_a_new_worker(tmp_path, worker_env):
    """A worker being killed can keep its listening socket for a moment: a caller that
    connects then is queued and reset, never taken (no ACK). That is no worker, not a message
    lost half-way: a new worker is started and serves it. (Seen under load: the next message
    after a kill failed with a broken pipe.)"""
    import threading

    _, evaluate, node = _messages(tmp_path)
    path = worker.socket_path(worker_env.pid, 7)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def dying() -> None:
        conn, _ = listener.accept()
        conn.close()  # never sent ACK
        listener.close()

    threading.Thread(target=dying, daemon=True).start()
    out = worker.call("evaluate", evaluate, _context(node), watch=worker_env.pid)
    assert "metrics" in out
    assert len(_workers(tmp_path / "sockets")) == 1


def _spare(monkeypatch) -> tuple[subprocess.Popen, Path]:
    """A node's spare worker, started as a node's starter does; the node's env points to it."""
    proc, node_env = spare.start_spare()
    monkeypatch.setenv(worker.SPARE_ENV, node_env[worker.SPARE_ENV])
    return proc, Path(node_env[worker.SPARE_ENV])


def test_starters_in_one_socket_folder_never_take_each_others_spare(tmp_path, monkeypatch):
    """Containers sharing a ``FEDYOLO_WORKER_DIR`` volume: their starters may have the same
    pid. Each spare's name is its own, and a name already there is passed over, never
    removed: here the second starter draws the first one's name before its own."""
    monkeypatch.setenv("FEDYOLO_WORKER_DIR", str(tmp_path))
    draws = iter(["a" * 10, "a" * 10, "b" * 10])
    monkeypatch.setattr(spare.secrets, "token_hex", lambda n: next(draws))
    specs = [spare.spare_command(watch=1) for _ in range(2)]
    first, second = (Path(s.node_env[spare.SPARE_ENV]) for s in specs)
    assert first.name == "saaaaaaaaaa.v2.sock" and second.name == "sbbbbbbbbbb.v2.sock"
    with specs[0].listener as listener, specs[1].listener, socket.socket(socket.AF_UNIX) as c:
        c.connect(str(first))  # the first node's spare is still the one listening there
        listener.settimeout(10)
        listener.accept()[0].close()


def test_a_spare_started_with_the_node_is_adopted_by_its_first_message(
    tmp_path, worker_env, monkeypatch
):
    """The node's first message takes over the spare (no second worker is started), which
    then serves that node and lives for its SuperExec, not for its starter."""
    _, evaluate, node = _messages(tmp_path)
    spare, spare_path = _spare(monkeypatch)
    out = worker.call("evaluate", evaluate, _context(node), watch=worker_env.pid)
    assert 0.0 <= out["metrics"]["map50-95"] <= 1.0
    assert [p.pid for p in _workers(tmp_path / "sockets")] == [spare.pid]  # adopted, no other
    assert not spare_path.exists() and worker.socket_path(worker_env.pid, 7).exists()
    worker.call("evaluate", evaluate, _context(node), watch=worker_env.pid)
    assert [p.pid for p in _workers(tmp_path / "sockets")] == [spare.pid]
    worker_env.kill()  # its SuperExec ends (its starter, this process, goes on)
    worker_env.wait()
    spare.wait(timeout=15)
    assert not worker.socket_path(worker_env.pid, 7).exists()


def _adopt_raw(path: Path, header: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as s, s.makefile("rwb") as f:
        s.settimeout(worker.START_TIMEOUT)
        s.connect(str(path))
        assert s.recv(1) == worker.ACK
        for frame in (json.dumps(header).encode(), b"", b""):
            worker._send(f, frame)
        f.flush()
        return json.loads(worker._recv(f))


def test_a_spare_takes_only_a_node_socket_of_its_folder_and_a_live_process(
    tmp_path, worker_env, monkeypatch
):
    """An adopt request that names a path elsewhere, a socket name that is not a node's, or a
    process that is not there is refused, and the spare stays ready for its node. A worker
    that serves a node refuses to be adopted again. A spare that is gone is passed over: the
    node starts its own worker."""
    _, evaluate, node = _messages(tmp_path)
    spare, spare_path = _spare(monkeypatch)
    good = worker.socket_path(worker_env.pid, 7)
    code = worker.code_digest()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for bad in (
        {"path": str(tmp_path / f"{worker_env.pid}-7.v2.sock"), "watch": worker_env.pid},
        {"path": str(good.parent / "elsewhere.sock"), "watch": worker_env.pid},
        {"path": str(good), "watch": "1; rm -rf /"},
        {"path": str(good), "watch": dead.pid},
    ):
        reply = _adopt_raw(spare_path, {"kind": "adopt", "code": code, **bad})
        assert reply["ok"] is False and reply["error"].startswith("ValueError"), bad
    assert spare_path.exists() and not good.exists()
    taken = worker.socket_path(worker_env.pid, 8)  # another node's worker listens there
    taken.touch()
    reply = _adopt_raw(spare_path, {"kind": "adopt", "code": code, "path": str(taken),
                                    "watch": worker_env.pid})  # fmt: skip
    assert reply["error"].startswith("ValueError") and "exists" in reply["error"]
    assert spare_path.exists() and taken.exists()
    worker.call("evaluate", evaluate, _context(node), watch=worker_env.pid)
    assert [p.pid for p in _workers(tmp_path / "sockets")] == [spare.pid]
    again = {"kind": "adopt", "code": code, "path": str(good), "watch": worker_env.pid}
    assert _adopt_raw(good, again)["error"] == (
        "ValueError: this worker already serves a node (not a spare)"
    )

    # the spare is gone (adopted above): a node pointing at it starts its own worker
    other = worker.call("evaluate", evaluate, _context({**node}), watch=os.getpid())
    assert "metrics" in other
    pids = {p.pid for p in _workers(tmp_path / "sockets")}
    assert spare.pid in pids and len(pids) == 2


def test_a_spare_that_says_it_took_the_node_but_does_not_listen_fails_the_message(
    tmp_path, worker_env, monkeypatch
):
    """A spare answers that it now serves the node, then the node's socket does not answer:
    the message fails with a message naming that, and no second worker is started (one would
    unlink the adopted worker's socket and leave it idle)."""
    import threading

    fake = tmp_path / "spare.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(fake))
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        with conn, conn.makefile("rwb") as f:
            conn.sendall(worker.ACK)
            for _ in range(3):
                worker._recv(f)
            worker._send(f, json.dumps({"ok": True}).encode())
            f.flush()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    monkeypatch.setenv(worker.SPARE_ENV, str(fake))
    path = worker.socket_path(worker_env.pid, 7)
    with pytest.raises(RuntimeError, match="spare worker took .* first connection failed"):
        worker._connect_or_start(path, worker_env.pid)
    t.join(timeout=10)
    srv.close()
    assert _workers(tmp_path / "sockets") == []


def test_a_worker_removes_only_its_own_socket_and_never_takes_a_live_one(tmp_path, worker_env):
    """A worker started where a live worker listens ends and leaves that socket alone; a
    worker whose socket file was replaced (its node's next worker took the path) does not
    remove the replacement when it ends."""
    path = worker.socket_path(worker_env.pid, 7)
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))  # a live worker's, as far as a new one can tell
    other.listen(1)
    cmd, env = worker.worker_command(path, worker_env.pid, os.environ)
    late = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert late.returncode != 0 and b"Address already in use" in late.stderr
    assert path.exists()
    other.close()
    path.unlink()

    own = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    assert _wait(path.exists, 60)
    path.unlink()  # its socket file replaced by another worker's
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    worker_env.kill()  # its SuperExec ends: it leaves
    worker_env.wait()
    own.wait(timeout=15)
    assert path.exists()  # the other worker's socket is still there
    other.close()
