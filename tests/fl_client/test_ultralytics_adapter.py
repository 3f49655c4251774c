"""The Ultralytics internals fedyolo relies on (fl_client/ultralytics_adapter.py) still hold.

Each assertion names the assumption: when an Ultralytics upgrade breaks one, this test says
which, instead of a client silently training with integrations on or without FedProx.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch


def test_trainer_init_registers_integrations_through_the_function_we_swap():
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.utils import callbacks

    assert hasattr(callbacks, "add_integration_callbacks"), (
        "ultralytics.utils.callbacks.add_integration_callbacks is gone: lean_ultralytics() "
        "no longer keeps Ultralytics' ClearML/TensorBoard/W&B callbacks off clients"
    )
    assert "callbacks.add_integration_callbacks(self)" in inspect.getsource(BaseTrainer.__init__), (
        "BaseTrainer.__init__ no longer calls callbacks.add_integration_callbacks(self) by "
        "attribute lookup: swapping it in lean_ultralytics() has no effect"
    )


def test_clear_memory_is_the_per_epoch_hook_we_override():
    from ultralytics.engine.trainer import BaseTrainer

    assert list(inspect.signature(BaseTrainer._clear_memory).parameters) == ["self", "threshold"], (
        "BaseTrainer._clear_memory(threshold) changed: LocalTrainer._clear_memory overrides it"
    )


def test_optimizer_step_unscales_the_gradients_it_finds():
    """FedProx adds its term to the still-scaled gradients before Ultralytics' own step."""
    from ultralytics.engine.trainer import BaseTrainer

    src = inspect.getsource(BaseTrainer.optimizer_step)
    assert src.index("unscale_") < src.index("clip_grad_norm_") < src.index(".step("), (
        "BaseTrainer.optimizer_step no longer un-scales, clips, then steps: the FedProx term "
        "in LocalTrainer.optimizer_step assumes it does"
    )
    assert torch.amp.GradScaler("cpu", enabled=False).get_scale() == 1.0


def test_fedprox_term_reaches_the_gradient_through_ultralytics_step():
    """Two parameters, one step of SGD through the real LocalTrainer.optimizer_step."""
    from fl_client.train import RoundTiming
    from fl_client.ultralytics_adapter import local_trainer_class

    cls = local_trainer_class()
    trainer = cls.__new__(cls)  # only what optimizer_step touches
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    trainer.model, trainer.ema, trainer.timing = model, None, RoundTiming()
    trainer.prox_mu, trainer.batch_size = 0.5, 4
    trainer.prox_ref = [torch.zeros_like(model.weight)]
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.device = torch.device("cpu")
    model.weight.grad = torch.zeros_like(model.weight)  # the task loss' gradient: zero
    trainer.optimizer_step()
    # gradient µ·B·(w − w_ref) = 2·w, step 0.1 → w·0.8
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[0.8, -0.8]]))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_safe_load_switch_makes_plain_yolo_loads_weights_only(tmp_path):
    """weights_only_ultralytics() flips the module global torch_safe_load and parse_model read."""
    import pytest
    from ultralytics import YOLO
    from ultralytics.nn import tasks

    from fl_client.ultralytics_adapter import weights_only_ultralytics

    assert "safe_only = SAFE_LOAD" in inspect.getsource(tasks.torch_safe_load), (
        "torch_safe_load no longer defaults to ultralytics.nn.tasks.SAFE_LOAD: "
        "weights_only_ultralytics() no longer makes YOLO(path) weights-only"
    )
    assert "_SafeLoad.restricted()" in inspect.getsource(tasks.parse_model), (
        "parse_model no longer asks _SafeLoad.restricted(): a model yaml's activation is eval-ed"
    )
    weights_only_ultralytics()
    evil = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode(tmp_path / "ran")}, evil)
    with pytest.raises(TypeError, match="evil.pt"):
        YOLO(str(evil))  # Ultralytics' own loader, through the switch
    assert not (tmp_path / "ran").exists()
    with pytest.raises(TypeError):  # an architecture's strings are never eval-ed
        tasks.DetectionModel(
            {**tasks.yaml_model_load("yolov8n.yaml"), "activation": "print('x') or nn.SiLU()"},
            verbose=False,
        )


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_an_optimizer_s_state_goes_back_into_a_fresh_one_and_only_where_it_fits(name):
    """``optimizer_arrays`` / ``load_optimizer_arrays`` (train.keep_momentum): the state of a
    trained optimiser restored into a new one for the same model is the same state; a state from
    another model, or a diverged one (NaN), is refused and leaves the new optimiser untouched."""
    from fl_client.model import build_model
    from fl_client.ultralytics_adapter import load_optimizer_arrays, optimizer_arrays

    def optimizer(model):
        groups = [list(model.parameters())[::2], list(model.parameters())[1::2]]
        extra = {"momentum": 0.9, "nesterov": True} if name == "SGD" else {}  # as Ultralytics
        return getattr(torch.optim, name)([{"params": g} for g in groups], lr=0.01, **extra)

    model = build_model("fedyolo-tiny.yaml", ["a", "b"])
    trained = optimizer(model)
    for _ in range(2):
        sum(p.square().sum() for p in model.parameters()).backward()
        trained.step()
    saved = optimizer_arrays(trained)
    assert saved and all(np.isfinite(v).all() for v in saved.values())

    fresh = optimizer(model)
    assert load_optimizer_arrays(fresh, saved)
    again = optimizer_arrays(fresh)
    assert again.keys() == saved.keys()
    assert all(np.array_equal(again[k], v) for k, v in saved.items())

    other = optimizer(build_model("fedyolo-tiny.yaml", ["a", "b", "c"]))  # another head
    assert not load_optimizer_arrays(other, saved)
    assert optimizer_arrays(other) == {}
    assert not load_optimizer_arrays(optimizer(model), {"x.momentum_buffer": np.zeros(1)})
    diverged = {k: np.full_like(v, np.nan) for k, v in saved.items()}  # a diverged round's
    spared = optimizer(model)
    assert not load_optimizer_arrays(spared, diverged) and optimizer_arrays(spared) == {}


@pytest.mark.parametrize(
    "name, extra",
    [
        ("SGD", {"momentum": 0.9, "nesterov": True}),
        ("Adam", {}),
        ("AdamW", {"fused": True}),  # fused kernels keep their step count with the weights
    ],
)
def test_a_restored_optimizer_takes_the_step_the_original_would(name, extra):
    """The restored state is the state the optimiser steps with: from the same weights and
    gradients, the next step of an optimiser given the kept arrays moves every weight exactly as
    the original's next step does (and not as a fresh optimiser's would)."""
    import copy

    from fl_client.model import build_model
    from fl_client.ultralytics_adapter import load_optimizer_arrays, optimizer_arrays

    def step(model, opt):
        opt.zero_grad()
        sum(p.square().sum() for p in model.parameters()).backward()
        opt.step()

    def build(model):
        return getattr(torch.optim, name)(model.parameters(), lr=0.01, **extra)

    model = build_model("fedyolo-tiny.yaml", ["a", "b"])
    original = build(model)
    for _ in range(2):
        step(model, original)
    twin, cold = copy.deepcopy(model), copy.deepcopy(model)
    restored = build(twin)
    assert load_optimizer_arrays(restored, optimizer_arrays(original))
    step(model, original)
    step(twin, restored)
    step(cold, build(cold))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pairs = zip(model.parameters(), cold.parameters(), strict=True)
    assert any(not torch.equal(a, c) for a, c in pairs)
