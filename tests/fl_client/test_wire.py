"""The round contract (fl_client.wire): one typed config both ways, typed replies both ways,
failures with a client id, and every key of the contract named by wire.py's constants."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_client import wire
from fl_client.wire import (
    SCHEDULE_KEYS,
    ClientFailure,
    EvalReply,
    RoundConfig,
    TrainArgs,
    TrainReply,
    WireError,
)
from fl_server.config import compose
from fl_server.records import ClientEntry
from fl_server.server_app import round_config

ROOT = Path(__file__).resolve().parents[2]


def _config() -> RoundConfig:
    return round_config(compose(["strategy=fedbn"]), ["car", "bus"], "/data/run", {"nc": 2})


def test_round_config_survives_a_flower_config_record():
    rc = _config().with_round(server_round=3, lr0=0.005, round_lrf=0.5, faults='[{"client": 1}]')
    back = RoundConfig.from_record(ConfigRecord(dict(rc.to_record())))
    assert back == rc
    assert back.train.lr0 == 0.005 and back.keep_local == ("bn",) and back.names == ("car", "bus")
    # the keys Flower's strategies add are the ones it uses
    assert {"server-round", "proximal-mu"} <= set(rc.to_record())


def test_every_train_key_of_the_config_is_a_field_and_back():
    cfg = compose([])
    sent = {k: v for k, v in cfg.train.items() if k not in SCHEDULE_KEYS}
    assert {f.name for f in dataclasses.fields(TrainArgs)} == set(sent)
    assert dataclasses.asdict(TrainArgs.from_cfg(cfg.train)) == sent


def test_a_missing_or_mistyped_key_is_named():
    rec = dict(_config().to_record())
    del rec["imgsz"]
    with pytest.raises(WireError, match="'imgsz'"):
        RoundConfig.from_record(ConfigRecord(rec))
    rec = dict(_config().to_record(), amp="yes")
    with pytest.raises(WireError, match="'amp'"):
        RoundConfig.from_record(ConfigRecord(rec))


def test_a_failure_reply_carries_the_client_id_as_a_field():
    msg = Message(content=RecordDict({}), dst_node_id=5, message_type="train")
    reply = ClientFailure(2, 4, "OSError: disk full").to_reply(msg)
    failure = ClientFailure.from_reply(reply)
    assert failure == ClientFailure(2, 4, "OSError: disk full")
    assert str(failure) == "client 2 (round 4): OSError: disk full"
    ok = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), reply_to=msg)
    assert ClientFailure.from_reply(ok) is None


# -- typed replies: to_content() on the client, parse(msg) on the server ------------------------
def _train_msg() -> Message:
    content = RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 2})})
    return Message(content=content, dst_node_id=7, message_type="train")


def _arrays(n: int = 8) -> ArrayRecord:
    return ArrayRecord({wire.WEIGHTS_KEY: Array(np.linspace(0, 1, n, dtype=np.float32))})


def _train_reply(**changes) -> TrainReply:
    reply = TrainReply(
        _arrays(),
        num_examples=12,
        partition_id=3,
        metrics={wire.LOSS: 0.5, wire.BATCHES: 7, wire.KEPT_STATE: 1, wire.FAULTS_IGNORED: 2},
        data_stats={"ds-images": 4, "ds-brightness": [0.5, 0.5]},
    )
    return dataclasses.replace(reply, **changes)


def _as_reply(content: RecordDict) -> Message:
    return Message(content, reply_to=_train_msg())


def test_a_train_reply_survives_its_content():
    sent = _train_reply()
    content = sent.to_content()
    assert list(content.metric_records[wire.METRICS]) == [  # the order the server records
        "num-examples", "partition-id", "loss", "batches", "kept-state", "faults-ignored",
        "ds-images", "ds-brightness",
    ]  # fmt: skip
    back = TrainReply.parse(_as_reply(content))
    assert (back.num_examples, back.partition_id) == (12, 3)
    assert dict(back.metrics) == dict(sent.metrics) and dict(back.data_stats) == sent.data_stats
    assert (
        back.arrays[wire.WEIGHTS_KEY].numpy().tolist()
        == _arrays()[wire.WEIGHTS_KEY].numpy().tolist()
    )
    assert back.batches == 7.0 and back.faults_ignored == 2


def test_an_eval_reply_survives_its_content_and_a_plug_in_reply_needs_only_num_examples():
    sent = EvalReply(num_examples=5, partition_id=1, metrics={wire.MAP50: 0.25})
    assert EvalReply.parse(_as_reply(sent.to_content())) == sent
    assert EvalReply.parse(_as_reply(EvalReply().to_content())) == EvalReply()
    plug_in = RecordDict({"arrays": _arrays(), "m": MetricRecord({"num-examples": 4})})
    got = TrainReply.parse(_as_reply(plug_in))
    assert (got.num_examples, got.partition_id, got.batches) == (4, None, None)


@pytest.mark.parametrize(
    ("metrics", "named"),
    [
        ({}, "num-examples"),
        ({"num-examples": 0}, "num-examples"),
        ({"num-examples": 2.5}, "num-examples"),
        ({"num-examples": float("nan")}, "num-examples"),
        ({"num-examples": 2**40}, "num-examples"),
        ({"num-examples": [3]}, "num-examples"),
        ({"num-examples": 3, "partition-id": -1}, "partition-id"),
        ({"num-examples": 3, "partition-id": 1.5}, "partition-id"),
        ({"num-examples": 3, "bytes-up": 1}, "bytes-up"),
        ({"num-examples": 3, "update-norm": 0.0}, "update-norm"),
        ({"num-examples": 3, "node_id": 9}, "node_id"),
        ({"num-examples": 3, "rss-mb": -1.0}, "rss-mb"),
        ({"num-examples": 3, "rss-mb": float("nan")}, "rss-mb"),
        ({"num-examples": 3, "rss-mb": float("inf")}, "rss-mb"),
        ({"num-examples": 3, "rss-mb": [512.0]}, "rss-mb"),
    ],
)
def test_every_malformed_train_metric_is_a_wire_error_naming_it(metrics, named):
    content = RecordDict({"arrays": _arrays(), "metrics": MetricRecord(metrics)})
    with pytest.raises(WireError, match=f"'{named}'"):
        TrainReply.parse(_as_reply(content))


@pytest.mark.parametrize("arrays", [{}, {"a": _arrays(), "b": _arrays()}])
def test_a_train_reply_needs_exactly_one_array_record(arrays):
    content = RecordDict({**arrays, "metrics": MetricRecord({"num-examples": 3})})
    with pytest.raises(WireError, match="one ArrayRecord"):
        TrainReply.parse(_as_reply(content))


def test_a_replys_peak_memory_is_a_finite_size_in_either_reply():
    """``rss-mb`` travels as sent (an int too); a malformed one rejects the reply, evaluate
    replies included, as any other malformed metric."""
    for value in (0, 812, 812.5):
        sent = TrainReply(_arrays(), num_examples=3, metrics={wire.RSS_MB: value})
        assert TrainReply.parse(_as_reply(sent.to_content())).metrics[wire.RSS_MB] == value
    assert EvalReply.parse(_as_reply(EvalReply(metrics={wire.RSS_MB: 9.5}).to_content()))
    bad = RecordDict({"metrics": MetricRecord({"num-examples": 1, wire.RSS_MB: -0.5})})
    with pytest.raises(WireError, match="'rss-mb'"):
        EvalReply.parse(_as_reply(bad))


def test_an_eval_reply_may_count_zero_examples_but_not_a_negative_number():
    ok = RecordDict({"metrics": MetricRecord({"num-examples": 0})})
    assert EvalReply.parse(_as_reply(ok)).num_examples == 0
    bad = RecordDict({"metrics": MetricRecord({"num-examples": -1})})
    with pytest.raises(WireError, match="'num-examples'"):
        EvalReply.parse(_as_reply(bad))


def test_every_reply_metric_is_a_typed_field_of_the_round_record():
    """The reply's metric names (wire.py) and ``ClientEntry`` (records.py) are one contract."""
    metric_names = [
        v
        for k, v in vars(wire).items()
        if k.isupper() and isinstance(v, str) and k not in _NOT_METRICS
    ]
    fields = set(ClientEntry.__annotations__)
    assert {wire.record_field(m) for m in metric_names} - {"partition_id"} <= fields
    assert fields >= wire.SERVER_FIELDS


_NOT_METRICS = {  # the contract's other keys: records of a content, arrays, config keys
    "ARRAYS", "CONFIG", "METRICS", "TEACHER_KEY", "TEACHER_ARCH_KEY", "FAILURE_KEY",
    "SERVER_ROUND", "WEIGHTS_KEY", "SCHEME_KEY", "DATA_STATS_PREFIX",
}  # fmt: skip
# modules that read or write the contract's keys: they name them by wire.py's constants
_USERS = (
    "fl_client/handlers.py", "fl_client/client_app.py", "fl_client/transport.py",
    "fl_client/data_stats.py", "fl_client/distill.py", "fl_client/faults.py",
    "fl_server/observed_grid.py", "fl_server/partition_binding.py", "strategies/guarded.py",
    "strategies/registry.py", "strategies/reply_rules.py",
)  # fmt: skip
# values that are also keys of other dicts those modules read (evaluate_checkpoint's result,
# the teacher's local cache file)
_ALSO_ELSEWHERE = {"map50", "precision", "recall", "weights"}


@pytest.mark.parametrize("path", _USERS)
def test_no_contract_key_is_written_as_a_literal_outside_wire(path):
    keys = {
        v for k, v in vars(wire).items() if k.isupper() and isinstance(v, str)
    } - _ALSO_ELSEWHERE
    tree = ast.parse((ROOT / path).read_text())
    literals = {
        (n.value, n.lineno)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in keys
    }
    assert literals == set(), f"{path}: use fl_client.wire's constants for {sorted(literals)}"
