"""Local training of one round on a client's shard, with Ultralytics' own trainer.

``LocalTrainer`` is Ultralytics' ``DetectionTrainer`` with five federated changes:

* it trains the model object it is given (the received global weights): Ultralytics'
  ``setup_model`` leaves a ready ``nn.Module`` as it is, so nothing is rebuilt from the yaml
  and nothing carries over from a previous round;
* no per-epoch validation, checkpoints or final evaluation: the server evaluates the global
  model on its held-out set, and a client's checkpoint would only cost disk time;
* no integrations: Ultralytics' ClearML/TensorBoard/W&B/Hub callbacks are never registered, so
  nothing fires per client (fedyolo's own tracking is on the server);
* FedProx: with ``prox_mu > 0`` the proximal term is added to every step's gradient;
* one optimiser step per batch (``nbs = batch``): Ultralytics accumulates gradients up to a
  nominal batch of 64, which on a small shard would leave a round with one or two steps.

The weights returned are those of ``trainer.model`` — the raw model the optimiser updated — not
the EMA. Ultralytics restarts its EMA at every ``train()`` call; over one round of a few dozen
steps it is a lagging copy of the raw weights, and the server's averaging over clients already
smooths. The raw weights are also exactly what the next round continues from.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

LOGGER = logging.getLogger(__name__)


@dataclass
class RoundTiming:
    """Where a client's round went (seconds)."""

    setup: float = 0.0  # trainer construction, dataset and dataloader build, optimiser
    epochs: float = 0.0  # inside the epoch loops: loading batches, forward, backward, step
    batches: float = 0.0  # forward, backward and optimiser step only
    batch_count: int = 0
    _t_batch: float = field(default=0.0, repr=False)
    _t_epoch: float = field(default=0.0, repr=False)


def _local_trainer_class() -> type:
    """Build the trainer subclass lazily, so importing fedyolo does not import Ultralytics."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    class LocalTrainer(DetectionTrainer):
        def __init__(
            self,
            model: torch.nn.Module,
            overrides: dict[str, Any],
            timing: RoundTiming,
            prox_mu: float = 0.0,
        ):
            super().__init__(overrides=overrides)
            self.model = model
            self.timing = timing
            self.prox_mu = prox_mu
            self.prox_ref: list[torch.Tensor] | None = None
            self.add_callback("on_train_start", self._on_train_start)
            self.add_callback("on_train_epoch_start", self._on_epoch_start)
            self.add_callback("on_train_epoch_end", self._on_epoch_end)
            self.add_callback("on_train_batch_start", self._on_batch_start)
            self.add_callback("on_train_batch_end", self._on_batch_end)

        # --- timing -------------------------------------------------------------------------
        @staticmethod
        def _on_train_start(trainer: Any) -> None:
            trainer.timing.setup = time.perf_counter() - trainer.timing.setup
            if trainer.prox_mu > 0:  # the global weights, on the training device
                trainer.prox_ref = [p.detach().clone() for p in trainer.model.parameters()]

        # --- FedProx ------------------------------------------------------------------------
        def optimizer_step(self) -> None:
            """Ultralytics' step with FedProx's proximal term added to the gradient.

            The local objective becomes L(w) + µ/2·‖w − w_global‖² (Li et al., 2020). Ultralytics'
            detection loss is the *sum* over the batch (mean loss × batch size), so the term's
            gradient is added as µ·B·(w − w_global): µ keeps its meaning relative to the
            per-image loss. It is added after un-scaling (AMP) and before Ultralytics' gradient
            clipping, so both terms are clipped together as one gradient.
            """
            if self.prox_mu <= 0 or self.prox_ref is None:
                return super().optimizer_step()
            self.scaler.unscale_(self.optimizer)
            scale = self.prox_mu * self.batch_size
            with torch.no_grad():
                for p, ref in zip(self.model.parameters(), self.prox_ref, strict=True):
                    if p.grad is not None:
                        p.grad.add_(p.detach() - ref, alpha=scale)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad()
            if self.ema:
                self.ema.update(self.model)

        @staticmethod
        def _on_epoch_start(trainer: Any) -> None:
            trainer.timing._t_epoch = time.perf_counter()

        @staticmethod
        def _on_epoch_end(trainer: Any) -> None:
            trainer.timing.epochs += time.perf_counter() - trainer.timing._t_epoch

        @staticmethod
        def _on_batch_start(trainer: Any) -> None:
            trainer.timing._t_batch = time.perf_counter()

        @staticmethod
        def _on_batch_end(trainer: Any) -> None:
            trainer.timing.batches += time.perf_counter() - trainer.timing._t_batch
            trainer.timing.batch_count += 1

        # --- federated changes --------------------------------------------------------------
        def validate(self) -> tuple[dict, None]:
            return self.metrics, None

        def save_model(self) -> bool:
            return False

        def final_eval(self) -> None:
            return None

        def plot_training_labels(self) -> None:
            return None

        def _clear_memory(self, threshold: float | None = None) -> None:
            # On CPU there is no accelerator memory to free; Ultralytics' gc.collect() here
            # costs ~0.4 s per call in a process holding torch and Flower.
            if self.device.type != "cpu":
                super()._clear_memory(threshold)

    return LocalTrainer


_TRAINER_CLASS: type | None = None


@contextlib.contextmanager
def lean_ultralytics() -> Iterator[None]:
    """Scope in which Ultralytics' trainer registers no integration callbacks.

    Ultralytics adds its integration callbacks (ClearML, TensorBoard, W&B, Hub, ...) and fires
    ``on_pretrain_routine_start`` inside ``BaseTrainer.__init__``, before a subclass could remove
    them; replacing the registration function for the duration of the round is the only way to
    keep e.g. its ClearML callback from initialising on every client.
    """
    from ultralytics.utils import callbacks

    saved = callbacks.add_integration_callbacks
    callbacks.add_integration_callbacks = lambda instance: None
    try:
        yield
    finally:
        callbacks.add_integration_callbacks = saved


@dataclass
class LocalResult:
    """What a round of local training produced."""

    num_examples: int
    losses: dict[str, float]  # mean training losses of the last epoch: box, cls, dfl
    timing: RoundTiming


def train_round(
    model: torch.nn.Module,
    data_yaml: Path,
    workdir: Path,
    *,
    epochs: int,
    imgsz: int,
    batch: int,
    lr0: float,
    optimizer: str,
    momentum: float,
    weight_decay: float,
    mosaic: float,
    device: str,
    amp: bool,
    workers: int,
    seed: int,
    prox_mu: float = 0.0,
) -> LocalResult:
    """Train ``model`` in place for ``epochs`` local epochs on the shard in ``data_yaml``."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        _TRAINER_CLASS = _local_trainer_class()
    timing = RoundTiming(setup=time.perf_counter())
    overrides = {
        "model": "fedyolo-global",  # unused: the trainer gets the model object
        "data": str(data_yaml),
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "nbs": batch,
        "lr0": lr0,
        "lrf": 1.0,  # constant LR within a round; the server owns the schedule across rounds
        "warmup_epochs": 0,
        "optimizer": optimizer,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "mosaic": mosaic,
        "close_mosaic": 0,
        "device": device,
        "amp": amp,
        "workers": workers,
        "seed": seed,
        "deterministic": False,
        "val": False,
        "plots": False,
        "save": False,
        "cache": False,
        "verbose": False,
        "project": str(workdir),
        "name": "train",
        "exist_ok": True,
    }
    with lean_ultralytics():
        trainer = _TRAINER_CLASS(model, overrides, timing, prox_mu)
        trainer.train()
    trained = trainer.model
    if trained is not model:  # the trainer only moves the same object between devices
        raise RuntimeError("Ultralytics trained another model object than the one received")
    model.to("cpu")
    losses = {}
    if trainer.tloss is not None:
        losses = (
            {k: float(v) for k, v in trainer.tloss.items()}
            if isinstance(trainer.tloss, dict)
            else dict(zip(trainer.loss_names, [float(x) for x in trainer.tloss], strict=False))
        )
    return LocalResult(
        num_examples=len(trainer.train_loader.dataset),
        losses=losses,
        timing=timing,
    )


def resolve_device(device: str) -> str:
    """``auto`` → ``0`` (first CUDA device) when CUDA is present, else ``cpu``."""
    if str(device) == "auto":
        return "0" if torch.cuda.is_available() else "cpu"
    return str(device)
