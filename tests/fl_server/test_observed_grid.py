"""Per-client bookkeeping at the Grid: bytes, failures, missing replies, NaN updates."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fl_server.observed_grid import ObservedGrid
from fl_server.run_dir import RunDir, read_jsonl


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Flower stamps messages with the running task's identity; give the test one.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid(Grid):
    """Answers each message with ``behaviour[node_id](message)`` (None = no reply)."""

    def __init__(self, behaviour):
        self.behaviour = behaviour

    def set_run(self, run):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, *a, **k):  # pragma: no cover - not used
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.behaviour)

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = [self.behaviour[m.metadata.dst_node_id](m) for m in messages]
        return [r for r in replies if r is not None]


def _weights(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((256,), value, dtype=np.float32))})


def _ok(pid: int, value: float = 1.0):
    def reply(msg):
        metrics = MetricRecord(
            {"num-examples": 10 + pid, "partition-id": pid, "loss": 0.5, "train-seconds": 1.5}
        )
        return Message(RecordDict({"arrays": _weights(value), "metrics": metrics}), reply_to=msg)

    return reply


def _raises(msg):
    return Message(Error(code=0, reason="ClientApp raised: CUDA out of memory"), reply_to=msg)


def _send(grid: ObservedGrid, nodes, server_round=3):
    content = RecordDict(
        {"arrays": _weights(0.0), "config": ConfigRecord({"server-round": server_round})}
    )
    msgs = [Message(content=content, dst_node_id=n, message_type="train") for n in nodes]
    return grid.send_and_receive(msgs, timeout=5)


def test_records_clients_failures_timeouts_and_drops_nan_updates(tmp_path):
    run = RunDir(tmp_path)
    behaviour = {11: _ok(0), 12: _ok(1, float("nan")), 13: _raises, 14: lambda m: None, 15: _ok(2)}
    grid = ObservedGrid(FakeGrid(behaviour), run)
    replies = _send(grid, list(behaviour))

    # The NaN update never reaches the strategy; the error reply does (Flower counts it).
    kept_nodes = sorted(r.metadata.src_node_id for r in replies)
    assert kept_nodes == [11, 13, 15]
    log = grid.rounds[3]
    assert [c["id"] for c in log.clients] == [0, 2]
    c0 = log.clients[0]
    assert c0["num_examples"] == 10 and c0["train_seconds"] == 1.5
    # Flower's serialized size of the arrays (data + NumPy header + key), each way.
    assert c0["bytes_down"] == c0["bytes_up"] == _weights(0.0).count_bytes() > 256 * 4
    assert log.failed == 3
    events = read_jsonl(run.events)
    kinds = {(e["kind"], e["node_id"]) for e in events}
    assert ("update_rejected", 12) in kinds
    assert ("client_failed", 13) in kinds and ("client_failed", 14) in kinds
    failed = {e["node_id"]: e for e in events if e["kind"] == "client_failed"}
    assert "CUDA out of memory" in failed[13]["reason"]
    assert "no reply" in failed[14]["reason"]
    assert all(e["round"] == 3 for e in events)
    json.dumps(events)  # the events file is valid JSON lines
