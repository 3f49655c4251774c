"""No reply can end a round: random and adversarial replies through the grid and aggregation.

Each example sends one round to four nodes and answers with replies drawn by Hypothesis
(hostile metrics, forged transport headers, NaN weights, wrong shapes, errors, silence). The
round must come back (never raise), every reply must either reach the strategy or be named in
``events.jsonl``, and the aggregate must be finite or the round cleanly failed.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import StubGrid, transport_spec

from fl_client.model import WEIGHTS_KEY
from fl_client.transport import encode
from fl_server.observed_grid import ObservedGrid
from fl_server.run_dir import RunDir, read_jsonl
from strategies import AggregationPolicy, GuardedStrategy

N = 256
NODES = (1, 2, 3, 4)
SENT = np.linspace(-1, 1, N, dtype=np.float32)

numbers = st.one_of(
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -99, 2**40, 3e9, float("nan"), float("inf")]),
)
metric_keys = st.sampled_from(
    ["num-examples", "partition-id", "node-id", "bytes-up", "bytes-down", "id", "update-norm",
     "loss", "train-seconds", "ds-images", "rss-mb"]
)  # fmt: skip


@st.composite
def arrays(draw) -> ArrayRecord:
    kind = draw(st.sampled_from(["good", "nan", "short", "forged", "scheme", "two", "empty"]))
    trained = SENT + draw(st.floats(-0.01, 0.01))
    if kind == "good":
        return ArrayRecord({WEIGHTS_KEY: Array(trained.astype(np.float32))})
    if kind == "nan":
        bad = trained.copy()
        bad[draw(st.integers(0, N - 1))] = np.nan
        return ArrayRecord({WEIGHTS_KEY: Array(bad.astype(np.float32))})
    if kind == "short":
        return ArrayRecord({WEIGHTS_KEY: Array(trained[: draw(st.integers(0, N - 1))])})
    scheme = draw(st.sampled_from(["fp16", "q8", "q4", "topk"]))
    record, _ = encode(trained, SENT, transport_spec(scheme), None)
    if kind == "forged":  # the header claims any size and block
        meta = [draw(st.integers(-(2**62), 2**62)), draw(st.integers(-(2**20), 2**40))]
        record["meta"] = Array(np.array(meta, np.int64))
    elif kind == "scheme":
        record["scheme"] = Array(np.array([draw(st.integers(-128, 127))], np.int8))
    elif kind == "two":
        record["extra"] = Array(np.zeros(3, np.float32))
    else:
        record = ArrayRecord({})
    return record


@st.composite
def reply_to(draw, msg: Message) -> Message | None:
    form = draw(st.sampled_from(["ok", "ok", "error", "silent", "no-metrics"]))
    if form == "silent":
        return None
    if form == "error":
        return Message(Error(code=0, reason=draw(st.text(max_size=40))), reply_to=msg)
    metrics = {"num-examples": 10, "partition-id": msg.metadata.dst_node_id - 1}
    metrics.update(draw(st.dictionaries(metric_keys, numbers, max_size=4)))
    content = {"arrays": draw(arrays())}
    if form == "ok":
        content["metrics"] = MetricRecord(metrics)
    return Message(RecordDict(content), reply_to=msg)


class DrawnGrid(StubGrid):
    def __init__(self, data):
        self.data = data
        self.node_ids = list(NODES)

    def send_and_receive(self, messages, *, timeout=None):
        replies = [self.data.draw(reply_to(m)) for m in messages]
        self.claimed = {  # what each node's reply said its partition is
            m.metadata.dst_node_id: r.content["metrics"]["partition-id"]
            for m, r in zip(messages, replies, strict=True)
            if r is not None and not r.has_error() and "metrics" in r.content
        }
        return [r for r in replies if r is not None]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_reply_costs_at_most_itself(tmp_path_factory, data):
    run = RunDir(tmp_path_factory.mktemp("fuzz"))
    policy = AggregationPolicy(min_replies=1, max_update_ratio=0.5)
    drawn = DrawnGrid(data)
    grid = ObservedGrid(drawn, run, policy)
    strategy = GuardedStrategy(FedAvg(), policy, run_dir=run)
    content = RecordDict(
        {"arrays": ArrayRecord({WEIGHTS_KEY: Array(SENT)}), "config": ConfigRecord({})}
    )
    content["config"]["server-round"] = 1
    msgs = [Message(content=content, dst_node_id=n, message_type="train") for n in NODES]
    replies = grid.send_and_receive(msgs, timeout=1)  # must not raise
    arrays_out, _ = strategy.aggregate_train(1, replies)  # must not raise
    if arrays_out is not None:
        assert np.isfinite(arrays_out[WEIGHTS_KEY].numpy()).all()
    log = grid.rounds[1]
    events = read_jsonl(run.events)
    named = {e["node_id"] for e in events if e["kind"] in ("client_failed", "update_rejected")}
    accepted = {c["node_id"] for c in log.clients}
    assert accepted | named == set(NODES) and not accepted & named
    for c in log.clients:  # what the server measured is the server's; the partition, the claim's
        # (a drawn metric may claim another node's partition: bound to it when that one is free)
        assert c["id"] == drawn.claimed[c["node_id"]] and c["num_examples"] >= 1
        assert isinstance(c["bytes_up"], int) and math.isfinite(c.get("update_norm", 0.0))
        # a peak memory that is not a finite size was a rejection (named above), never recorded
        assert math.isfinite(c.get("rss_mb", 0.0)) and c.get("rss_mb", 0.0) >= 0
