"""Per-client bookkeeping at the Grid: bytes, failures, missing replies, NaN updates."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from testkit import StubGrid, transport_spec

from fl_client.model import WEIGHTS_KEY
from fl_client.transport import encode
from fl_server.flower_adapter import wire_bytes
from fl_server.observed_grid import ObservedGrid
from fl_server.run_dir import RunDir, read_jsonl
from strategies import AggregationPolicy


class FakeGrid(StubGrid):
    """Answers each message with ``behaviour[node_id](message)`` (None = no reply)."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.node_ids = list(behaviour)

    def send_and_receive(self, messages, *, timeout=None):
        replies = [self.behaviour[m.metadata.dst_node_id](m) for m in messages]
        self.replies = {r.metadata.src_node_id: r for r in replies if r is not None}
        self.wire = {n: wire_bytes(r) for n, r in self.replies.items()}  # before any decoding
        return [r for r in replies if r is not None]


N = 4096


def _weights(value) -> ArrayRecord:
    return ArrayRecord({WEIGHTS_KEY: Array(np.broadcast_to(value, (N,)).astype(np.float32))})


def _reply(msg, pid: int, arrays: ArrayRecord, num_examples: int | None = None, **more):
    metrics = MetricRecord(
        {
            "num-examples": 10 + pid if num_examples is None else num_examples,
            "partition-id": pid,
            "loss": 0.5,
            "train-seconds": 1.5,
            **more,
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _ok(pid: int, value: float = 1.0):
    return lambda msg: _reply(msg, pid, _weights(value))


def _raises(msg):
    return Message(Error(code=0, reason="ClientApp raised: CUDA out of memory"), reply_to=msg)


def _send(grid: ObservedGrid, nodes, server_round=3, value=0.5):
    content = RecordDict(
        {"arrays": _weights(value), "config": ConfigRecord({"server-round": server_round})}
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
    # The serialized Flower message, each way: what went over the wire.
    assert c0["bytes_up"] == grid._grid.wire[11] > N * 4
    assert c0["bytes_down"] > N * 4
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


def _rejections(run: RunDir) -> dict[int, str]:
    return {
        e["node_id"]: e["reason"] for e in read_jsonl(run.events) if e["kind"] == "update_rejected"
    }


def test_wrong_shape_dtype_and_keys_are_dropped_with_their_reason(tmp_path):
    run = RunDir(tmp_path)
    short = ArrayRecord({WEIGHTS_KEY: Array(np.ones(N - 1, np.float32))})
    as_f64 = ArrayRecord({WEIGHTS_KEY: Array(np.ones(N, np.float64))})
    renamed = ArrayRecord({"w": Array(np.ones(N, np.float32))})
    behaviour = {
        1: _ok(0),
        2: lambda m: _reply(m, 1, short),
        3: lambda m: _reply(m, 2, as_f64),
        4: lambda m: _reply(m, 3, renamed),
    }
    grid = ObservedGrid(FakeGrid(behaviour), run)
    replies = _send(grid, list(behaviour))
    assert [r.metadata.src_node_id for r in replies] == [1]  # the round goes on with the rest
    reasons = _rejections(run)
    assert "4095 values, expected 4096" in reasons[2]
    assert "dtype float64" in reasons[3]
    assert "expected arrays ['weights'], got ['w']" in reasons[4]


def test_huge_update_norm_is_dropped_against_the_global_model_and_the_median(tmp_path):
    run = RunDir(tmp_path)
    rng = np.random.default_rng(0)
    sent = 0.5
    behaviour = {
        n: (lambda pid: lambda m: _reply(m, pid, _weights(sent + rng.normal(0, 0.01, N))))(n)
        for n in range(4)
    }
    behaviour[4] = lambda m: _reply(m, 4, _weights(sent * 10))  # scaled weights: ratio 9
    behaviour[5] = lambda m: _reply(m, 5, _weights(sent + rng.normal(0, 0.2, N)))  # 20x median
    policy = AggregationPolicy(max_update_ratio=2.0, max_norm_x_median=10.0)
    grid = ObservedGrid(FakeGrid(behaviour), run, policy)
    replies = _send(grid, list(behaviour), value=sent)
    assert sorted(r.metadata.src_node_id for r in replies) == [0, 1, 2, 3]
    reasons = _rejections(run)
    assert "max_update_ratio" in reasons[4] and "9x the global model" in reasons[4]
    assert "max_norm_x_median" in reasons[5]
    norms = [c["update_norm"] for c in grid.rounds[3].clients]
    assert all(0.3 < n < 1.0 for n in norms), norms  # 0.01 * sqrt(4096) = 0.64


def test_norm_per_local_step_keeps_honest_skewed_shards_and_drops_a_scaled_update(tmp_path):
    """Honest norms grow with local steps (here as steps^0.8, what a Dirichlet-0.1 fleet
    showed): the raw median rule drops the big shard, the per-step rule keeps every honest
    client and drops the x10 update; a reply without a batch count counts as one step."""
    sent, rng = 0.5, np.random.default_rng(3)

    def honest(pid, steps, factor=1.0):
        noise = rng.normal(0, 0.002 * steps**0.8, N) * factor  # norm ~ 0.128 * steps^0.8
        return lambda m: _reply(m, pid, _weights(sent + noise), batches=steps)

    behaviour = {0: honest(0, 2), 1: honest(1, 4), 2: honest(2, 8), 3: honest(3, 64)}
    behaviour[4] = honest(4, 8, factor=10.0)  # scaled_weights at the median's step count
    noise5 = rng.normal(0, 0.002 * 8**0.8, N)
    behaviour[5] = lambda m: _reply(m, 5, _weights(sent + noise5))  # no 'batches': one step

    def run_with(policy, name):
        run = RunDir(tmp_path / name)
        run.path.mkdir()
        grid = ObservedGrid(FakeGrid(behaviour), run, policy)
        kept = sorted(r.metadata.src_node_id for r in _send(grid, list(behaviour), value=sent))
        return kept, _rejections(run)

    kept, reasons = run_with(AggregationPolicy(max_step_norm_x_median=4.0), "step")
    assert kept == [0, 1, 2, 3]
    assert "norm per local step" in reasons[4] and "max_step_norm_x_median=4.0" in reasons[4]
    assert "None batches" in reasons[5]
    kept, reasons = run_with(AggregationPolicy(max_norm_x_median=4.0), "raw")
    assert 3 not in kept and "max_norm_x_median" in reasons[3]  # the honest big shard


@pytest.mark.parametrize("scheme", ["fp16", "q8", "q4", "topk"])
def test_compressed_replies_reach_the_strategy_as_decoded_weights(tmp_path, scheme):
    run = RunDir(tmp_path)
    sent = np.full(N, 0.5, np.float32)
    trained = sent + np.random.default_rng(1).normal(0, 0.01, N).astype(np.float32)
    spec = transport_spec(scheme, fraction=0.5)
    record, _ = encode(trained, sent, spec, None)
    grid = ObservedGrid(FakeGrid({7: lambda m: _reply(m, 0, record)}), run)
    (reply,) = _send(grid, [7], value=0.5)
    got = reply.content["arrays"][WEIGHTS_KEY].numpy()
    assert got.dtype == np.float32 and got.shape == (N,)
    tol = {"fp16": 3e-5, "q8": 2e-4, "q4": 4e-3, "topk": 0.03}[scheme]
    assert np.abs(got - trained).max() < tol
    entry = grid.rounds[3].clients[0]
    # bytes up are those of the compressed message, not of the decoded weights
    assert entry["bytes_up"] == grid._grid.wire[7] < entry["bytes_down"]


def test_a_malformed_compressed_reply_is_dropped(tmp_path):
    run = RunDir(tmp_path)
    sent = np.full(N, 0.5, np.float32)
    record, _ = encode(sent + 0.01, sent, transport_spec("topk", fraction=0.1), None)
    idx = record["index"].numpy().copy()
    idx[-1] = N + 5  # an index outside the model
    record["index"] = Array(idx)
    grid = ObservedGrid(FakeGrid({7: lambda m: _reply(m, 0, record), 8: _ok(1)}), run)
    replies = _send(grid, [7, 8], value=0.5)
    assert [r.metadata.src_node_id for r in replies] == [8]
    assert "index out of range" in _rejections(run)[7]


def test_wire_bytes_of_shared_content_is_exact():
    content = RecordDict({"arrays": _weights(0.5), "config": ConfigRecord({"server-round": 1})})
    msgs = [Message(content=content, dst_node_id=n, message_type="train") for n in (1, 2**40)]
    sizes: dict[int, int] = {}
    for m in msgs:  # node ids of different varint widths: the metadata part differs
        assert wire_bytes(m, sizes) == wire_bytes(m)
    assert len(sizes) == 1  # the shared content was serialized once


def test_client_failures_name_the_client_from_a_field_and_bad_ones_never_raise(tmp_path):
    """A ClientApp's structured failure names its client; a malformed failure record, or one
    from a node nothing was sent to, is a recorded failure, not an exception in the round."""
    from fl_client.wire import FAILURE_KEY, ClientFailure

    def structured(msg):
        return ClientFailure(2, 3, "OSError: disk full").to_reply(msg)

    def malformed(msg):
        rec = ConfigRecord({"partition-id": float("nan"), "round": 3, "reason": "x"})
        return Message(RecordDict({FAILURE_KEY: rec}), reply_to=msg)

    def stranger(msg):  # a reply from node 99, which was never sent anything
        other = Message(content=RecordDict({}), dst_node_id=99, message_type="train")
        return ClientFailure(7, 3, "hi").to_reply(other)

    run = RunDir(tmp_path)
    behaviour = {21: structured, 22: malformed, 23: _ok(0)}
    grid = ObservedGrid(FakeGrid(behaviour), run)
    replies = _send(grid, list(behaviour))
    assert sorted(r.metadata.src_node_id for r in replies) == [21, 22, 23]
    errors = {r.metadata.src_node_id: r.error.reason for r in replies if r.has_error()}
    assert errors == {21: "client 2 (round 3): OSError: disk full", 22: errors[22]}
    assert "malformed failure reply" in errors[22]
    failed = {e["node_id"]: e for e in read_jsonl(run.events) if e["kind"] == "client_failed"}
    assert failed[21]["client"] == 2 and failed[22]["client"] == "node-22"

    (tmp_path / "b").mkdir()
    run2 = RunDir(tmp_path / "b")
    grid2 = ObservedGrid(FakeGrid({31: stranger}), run2)
    assert _send(grid2, [31]) == []  # nothing for the strategy, and no exception
    failed = {e["node_id"]: e["reason"] for e in read_jsonl(run2.events)}
    assert failed[99] == "client 7 (round 3): hi" and "no reply" in failed[31]


def test_a_reply_that_breaks_the_contract_is_a_rejection_naming_the_key(tmp_path):
    """``TrainReply.parse`` raises ``WireError`` naming the key; the grid records it as the
    reply's rejection and the round goes on with the others."""
    run = RunDir(tmp_path)
    behaviour = {
        0: _ok(0),
        1: lambda m: _reply(m, 1, _weights(0.5), num_examples=0),
        2: lambda m: _reply(m, 2, _weights(0.5), **{"bytes-up": 1}),
        3: lambda m: _reply(m, 3.5, _weights(0.5), num_examples=10),
    }
    grid = ObservedGrid(FakeGrid(behaviour), run)
    kept = [r.metadata.src_node_id for r in _send(grid, list(behaviour))]
    assert kept == [0]
    reasons = _rejections(run)
    assert reasons[1].startswith("WireError: metric 'num-examples'=0")
    assert reasons[2].startswith("WireError: metric 'bytes-up' names a field the server measures")
    assert reasons[3].startswith("WireError: metric 'partition-id'=3.5")
