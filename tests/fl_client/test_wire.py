"""The round contract (fl_client.wire): one typed config both ways, failures with a client id."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fl_client.wire import ClientFailure, RoundConfig, TrainArgs, WireError
from fl_server.config import compose
from fl_server.server_app import round_config


def _config() -> RoundConfig:
    return round_config(compose(["strategy=fedbn"]), ["car", "bus"], "/data/run", {"nc": 2})


def test_round_config_survives_a_flower_config_record():
    rc = _config().with_round(server_round=3, lr0=0.005, faults='[{"client": 1}]')
    back = RoundConfig.from_record(ConfigRecord(dict(rc.to_record())))
    assert back == rc
    assert back.train.lr0 == 0.005 and back.keep_local == ("bn",) and back.names == ("car", "bus")
    # the keys Flower's strategies add are the ones it uses
    assert {"server-round", "proximal-mu"} <= set(rc.to_record())


def test_every_train_key_of_the_config_is_a_field_and_back():
    cfg = compose([])
    assert {f.name for f in dataclasses.fields(TrainArgs)} == set(cfg.train)
    assert dataclasses.asdict(TrainArgs.from_cfg(cfg.train)) == dict(cfg.train)


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
