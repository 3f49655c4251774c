"""Local training starts from the received weights and returns the model it trained."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fl_client.model import build_model, load_record, part_masks, to_record
from fl_client.train import train_round

KW = dict(
    epochs=1,
    imgsz=64,
    batch=8,
    lr0=0.01,
    optimizer="SGD",
    momentum=0.9,
    weight_decay=0.0005,
    mosaic=0.0,
    device="cpu",
    amp=False,
    workers=0,
    seed=0,
)


def _names(data_yaml):
    import yaml

    names = yaml.safe_load(data_yaml.read_text())["names"]
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


def test_training_starts_from_received_weights(tiny_data, tmp_path, monkeypatch):
    names = _names(tiny_data)
    global_model = build_model("fedyolo-tiny.yaml", names)
    with torch.no_grad():  # a global model no yaml would produce
        for p in global_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    received = to_record(global_model)

    client = build_model("fedyolo-tiny.yaml", names)  # fresh random init, as on a new client
    load_record(client, received)
    seen = {}

    def spy(trainer):  # the first batch's model is the received model, not the yaml's
        if "w" not in seen:
            seen["w"] = copy.deepcopy(trainer.model.state_dict())

    from fl_client.ultralytics_adapter import local_trainer_class

    cls = local_trainer_class()
    orig_init = cls.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        self.add_callback("on_train_batch_start", spy)

    monkeypatch.setattr(cls, "__init__", init)
    result = train_round(client, tiny_data, tmp_path, **KW)
    ref = global_model.state_dict()
    for k, v in seen["w"].items():
        if v.dtype.is_floating_point:
            assert torch.equal(v, ref[k]), f"{k} did not start from the received weights"
    # ... and the returned model is the trained one: it moved away from the received weights.
    moved = sum(
        (client.state_dict()[k] - ref[k]).abs().sum().item()
        for k in ref
        if ref[k].dtype.is_floating_point
    )
    assert moved > 0
    assert result.num_examples == len(list((tiny_data.parent / "images").glob("*.jpg")))
    assert result.timing.batch_count == -(-result.num_examples // 8)
    assert set(result.losses) >= {"box_loss", "cls_loss", "dfl_loss"}
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())


def test_no_integration_callbacks_are_registered(tiny_data, tmp_path, monkeypatch):
    """Ultralytics' ClearML/TensorBoard/Hub callbacks never register or fire on a client."""
    from ultralytics.utils import callbacks

    from fl_client.train import RoundTiming
    from fl_client.ultralytics_adapter import lean_ultralytics, local_trainer_class

    calls = []
    monkeypatch.setattr(callbacks, "add_integration_callbacks", lambda t: calls.append(t))
    cls = local_trainer_class()
    model = build_model("fedyolo-tiny.yaml", _names(tiny_data))
    args = {
        "data": str(tiny_data),
        "model": "x",
        "project": str(tmp_path),
        "name": "t",
        "device": "cpu",
    }
    with lean_ultralytics():
        trainer = cls(model, args, RoundTiming())
    assert calls == []  # the real registration function was not reachable in the round
    modules = {cb.__module__ for cbs in trainer.callbacks.values() for cb in cbs}
    assert not any("integrations" in m or "clearml" in m or "hub" in m for m in modules)
    # ... and outside the round, Ultralytics is as it was.
    cls(model, args, RoundTiming())
    assert len(calls) == 1


def test_yolo26_end_to_end_head_trains_and_evaluates(tiny_data, tmp_path):
    """YOLO26's NMS-free head goes through the same round: train, checkpoint, evaluate."""
    from fl_client.evaluate import evaluate_checkpoint
    from fl_client.model import save_checkpoint

    model = build_model("yolo26n.yaml", _names(tiny_data))
    before = to_record(model)
    result = train_round(model, tiny_data, tmp_path, **KW)
    after = to_record(model)
    assert any(not np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)
    assert all(np.isfinite(v) for v in result.losses.values())
    ckpt = save_checkpoint(model, tmp_path / "g.pt", {"imgsz": 64}, {})
    res = evaluate_checkpoint(
        ckpt, tiny_data, imgsz=64, batch=16, device="cpu", workdir=tmp_path / "val"
    )
    assert all(0.0 <= res[k] <= 1.0 for k in ("map50", "map50_95", "precision", "recall"))


def test_fedprox_term_pulls_the_update_towards_the_global_model(tiny_data, tmp_path):
    """Same start, same seed: µ > 0 gives a smaller update, µ = 0 exactly the plain one."""
    start = build_model("fedyolo-tiny.yaml", _names(tiny_data))
    g = to_record(start)["weights"].numpy()
    params = part_masks(start)["params"]  # trained weights; BN statistics are not in the loss

    def update(mu: float) -> np.ndarray:
        model = copy.deepcopy(start)
        train_round(model, tiny_data, tmp_path, **{**KW, "epochs": 2, "lr0": 0.02}, prox_mu=mu)
        return (to_record(model)["weights"].numpy() - g)[params]

    plain, again, prox = update(0.0), update(0.0), update(0.5)
    noise = np.linalg.norm(plain - again)  # CPU training is not bit-exact across runs
    assert np.linalg.norm(prox - plain) > 10 * noise  # the term changes the update
    assert np.linalg.norm(prox) < 0.8 * np.linalg.norm(plain)  # ... towards the global model


def test_the_rounds_learning_rate_goes_from_lr0_to_lr0_times_lrf(tiny_data, tmp_path, monkeypatch):
    """The server's schedule reaches the optimizer: epoch e of E runs at lr0 x lf(e), Ultralytics'
    linear lf from 1 to ``lrf`` (train.lr_schedule; ``lrf=1`` is the constant rate)."""
    from fl_client.ultralytics_adapter import local_trainer_class

    seen: list[list[float]] = []
    cls = local_trainer_class()
    orig_init = cls.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        self.add_callback(
            "on_train_epoch_end", lambda t: seen.append([g["lr"] for g in t.optimizer.param_groups])
        )

    monkeypatch.setattr(cls, "__init__", init)
    model = build_model("fedyolo-tiny.yaml", _names(tiny_data))
    train_round(model, tiny_data, tmp_path, **{**KW, "epochs": 2, "lr0": 0.02}, lrf=0.5)
    assert len(seen) == 2
    assert seen[0] == pytest.approx([0.02] * len(seen[0]))
    assert seen[1] == pytest.approx([0.02 * 0.75] * len(seen[1]))  # (1 - 1/2)(1 - 0.5) + 0.5
