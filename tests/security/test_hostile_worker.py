"""A hostile caller of the warm worker (issue 28, item 10): the worker survives it.

Against one real worker process (``fl_client.worker``, started by a genuine message as a node
starts it): a terabyte length prefix, a connection that never speaks, a header that is not
JSON and records that are not protobuf each get an error reply or a closed connection, and the
same worker then answers a genuine evaluate message. Its read timeout is set short here
(``FEDYOLO_WORKER_READ_TIMEOUT``); every wait of the test is a generous bound, never a timing.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from flwr.app import Context, RecordDict
from inprocess import tiny_config

from fl_client import worker
from fl_client.model import build_model, to_record
from fl_server.prepare import prepare_run
from fl_server.server_app import round_config

NODE_ID = 7


@dataclass
class Live:
    superexec: subprocess.Popen
    evaluate: RecordDict
    node: dict
    pid: int  # the worker's

    @property
    def socket(self) -> Path:
        return worker.socket_path(self.superexec.pid, NODE_ID)

    def genuine(self) -> float:
        """A real evaluate message through the node's own caller; its mAP."""
        ctx = Context(
            run_id=1, node_id=NODE_ID, node_config=self.node, state=RecordDict(), run_config={}
        )
        out = worker.call("evaluate", self.evaluate, ctx, watch=self.superexec.pid)
        return float(out["metrics"]["map50-95"])


@contextlib.contextmanager
def _raw(live: Live) -> Iterator[tuple[socket.socket, object, int]]:
    """A connection the worker has taken (ACK read), its file, and the worker's pid."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(120)
        s.connect(str(live.socket))
        assert s.recv(1) == worker.ACK
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        with s.makefile("rwb") as f:
            yield s, f, pid


def _still_serving(live: Live) -> None:
    """The same worker process is alive and answers a genuine message."""
    assert 0.0 <= live.genuine() <= 1.0
    with _raw(live) as (_, _, pid):
        assert pid == live.pid


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("hostile-worker")
    env = pytest.MonkeyPatch()
    env.setenv("FEDYOLO_WORKER_DIR", str(root / "sockets"))
    env.setenv("FEDYOLO_WORKER_READ_TIMEOUT", "5")  # the worker's, inherited at its start
    (root / "sockets").mkdir()
    cfg = tiny_config(root, ["federation.rounds=1"], clients=2)
    run = prepare_run(cfg)
    names = json.loads(run.manifest.read_text())["data"]["names"]
    model = build_model(str(cfg.model.cfg), names)
    config = round_config(cfg, names, run.data, model.yaml).with_round(server_round=1)
    evaluate = RecordDict({"arrays": to_record(model), "config": config.to_record()})
    superexec = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)"])
    live = Live(superexec, evaluate, {"partition-id": 1, "warm-worker": True}, pid=0)
    try:
        live.genuine()  # starts the worker
        with _raw(live) as (_, _, pid):
            live.pid = pid
        yield live
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            if live.pid:
                psutil.Process(live.pid).kill()
        superexec.kill()
        superexec.wait()
        env.undo()


def _error_reply(f) -> str:
    """The error of a reply (its two record frames read too)."""
    reply = json.loads(worker._recv(f))
    worker._recv(f), worker._recv(f)
    assert reply["ok"] is False
    return reply["error"]


def test_a_terabyte_length_prefix_is_refused_and_the_worker_serves_on(live):
    with _raw(live) as (_, f, _):
        f.write(struct.pack("!Q", 1 << 40))
        f.write(b"x" * 4096)
        f.flush()
        with contextlib.suppress(ConnectionError):  # a closed connection is an answer too
            assert "1099511627776 bytes" in _error_reply(f)
    _still_serving(live)


def test_a_silent_connection_does_not_block_the_next_caller(live):
    result: list[float] = []
    with _raw(live):  # taken by the worker, and never a byte sent
        second = threading.Thread(target=lambda: result.append(live.genuine()), daemon=True)
        second.start()
        second.join(timeout=300)  # the silent one holds it for 5 s, not for ever
        assert result and 0.0 <= result[0] <= 1.0, "the second caller was not served"
    _still_serving(live)


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ((b"{not json", b"", b""), "the header is not JSON"),
        ((b"[1, 2]", b"", b""), "the header is a JSON list"),
        ((b"\xff\xfe", b"", b""), "the header is not JSON"),
        (
            (json.dumps({"kind": "evaluate", "code": worker.code_digest()}).encode(), b"\xff", b""),
            "a record is not a RecordDict (DecodeError",
        ),
    ],
    ids=["not-json", "not-an-object", "not-utf8", "bad-protobuf"],
)
def test_a_malformed_request_gets_an_error_reply_and_the_worker_serves_on(live, frames, error):
    with _raw(live) as (_, f, _):
        for frame in frames:
            worker._send(f, frame)
        f.flush()
        assert _error_reply(f).startswith(f"MalformedRequest: {error}")
    _still_serving(live)
