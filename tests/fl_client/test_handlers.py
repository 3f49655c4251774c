"""The client's train handler joins the server's round config to the trainer: a message made by
the server side, handled as a client does, reaches the real optimizer with the round's rate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import RecordDict
from inprocess import tiny_config

from fl_client.client_app import handle
from fl_client.model import build_model, to_record
from fl_server.prepare import prepare_run
from fl_server.server_app import round_config


@pytest.mark.parametrize("round_lrf", [1.0, 0.5])
def test_the_round_config_s_rate_reaches_the_optimizer(tmp_path, monkeypatch, round_lrf):
    """``round-lrf`` (train.lr_schedule) sets the rate the round ends at: epoch e of E runs at
    lr0 × (1 − e/E·(1 − lrf)), read from the real trainer's optimizer at each epoch's end."""
    from fl_client.ultralytics_adapter import local_trainer_class

    seen: list[float] = []
    cls = local_trainer_class()
    orig_init = cls.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        self.add_callback(
            "on_train_epoch_end", lambda t: seen.append(t.optimizer.param_groups[0]["lr"])
        )

    monkeypatch.setattr(cls, "__init__", init)
    cfg = tiny_config(tmp_path, ["federation.rounds=1", "train.epochs=2"], clients=2)
    run = prepare_run(cfg)
    names = json.loads(run.manifest.read_text())["data"]["names"]
    model = build_model(str(cfg.model.cfg), names)
    config = round_config(cfg, names, run.data, model.yaml).with_round(
        server_round=1, lr0=0.02, round_lrf=round_lrf
    )
    message = RecordDict({"arrays": to_record(model), "config": config.to_record()})
    reply = handle("train", message, {"partition-id": 0}, RecordDict())
    assert reply["metrics"]["num-examples"] > 0
    assert seen == pytest.approx([0.02, 0.02 * (1 - (1 - round_lrf) / 2)])


@pytest.mark.parametrize("keep", [True, False])
def test_keep_momentum_carries_a_client_s_optimizer_into_its_next_round(
    tmp_path, monkeypatch, keep
):
    """``train.keep_momentum``: round 2's first step starts from the momentum round 1 ended
    with (kept in the client's own Flower state); without it, from none."""
    from fl_client.handlers import OPTIMIZER, STATE_KEY
    from fl_client.ultralytics_adapter import local_trainer_class, optimizer_arrays

    first_step: list[dict] = []  # the optimiser's state as each round's first batch starts
    cls = local_trainer_class()
    orig_init = cls.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)

        def batch_start(t):
            if t.timing.batch_count == 0:
                first_step.append(optimizer_arrays(t.optimizer))

        self.add_callback("on_train_batch_start", batch_start)

    monkeypatch.setattr(cls, "__init__", init)
    cfg = tiny_config(
        tmp_path, ["federation.rounds=2", f"train.keep_momentum={str(keep).lower()}"], clients=2
    )
    run = prepare_run(cfg)
    names = json.loads(run.manifest.read_text())["data"]["names"]
    model = build_model(str(cfg.model.cfg), names)
    config = round_config(cfg, names, run.data, model.yaml)
    state = RecordDict()
    kept, reported = [], []
    for server_round in (1, 2):
        content = config.with_round(server_round=server_round, lr0=0.01).to_record()
        message = RecordDict({"arrays": to_record(model), "config": content})
        reply = handle("train", message, {"partition-id": 0}, state)
        reported.append(reply["metrics"].get("momentum-kept"))
        own = state.get(STATE_KEY, {})
        kept.append({k.removeprefix(OPTIMIZER): own[k].numpy() for k in own if OPTIMIZER in k})
    assert first_step[0] == {}  # round 1 always starts from zero momentum
    assert reported == ([0, 1] if keep else [None, None])  # recorded as momentum_kept
    if keep:
        assert kept[0] and any("momentum_buffer" in k for k in kept[0])
        assert first_step[1].keys() == kept[0].keys()
        assert all(np.array_equal(first_step[1][k], v) for k, v in kept[0].items())
        assert any(np.abs(v).sum() > 0 for v in first_step[1].values())
    else:
        assert kept == [{}, {}] and first_step[1] == {}
