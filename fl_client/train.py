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

The trainer subclass and everything that touches Ultralytics' internals live in
``fl_client.ultralytics_adapter``.
* one optimiser step per batch (``nbs = batch``): Ultralytics accumulates gradients up to a
  nominal batch of 64, which on a small shard would leave a round with one or two steps.

The weights returned are those of ``trainer.model`` — the raw model the optimiser updated — not
the EMA. Ultralytics restarts its EMA at every ``train()`` call; over one round of a few dozen
steps it is a lagging copy of the raw weights, and the server's averaging over clients already
smooths. The raw weights are also exactly what the next round continues from.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fl_client.ultralytics_adapter import (
    lean_ultralytics,
    local_trainer_class,
    optimizer_arrays,
    strip_feature_hooks,
    trainer_examples,
    trainer_losses,
)

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


@dataclass
class LocalResult:
    """What a round of local training produced."""

    num_examples: int
    losses: dict[str, float]  # mean training losses of the last epoch: box, cls, dfl (, dis)
    timing: RoundTiming
    projector: dict | None = None  # distillation: the projector's weights after the round
    optimizer_state: dict | None = None  # train.keep_momentum: the optimiser's, after the round
    optimizer_restored: bool = False  # train.keep_momentum: it started from the last round's


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
    lrf: float = 1.0,
    teacher: torch.nn.Module | None = None,
    distill_weight: float = 6.0,
    projector: dict | None = None,
    keep_momentum: bool = False,
    optimizer_state: dict | None = None,
) -> LocalResult:
    """Train ``model`` in place for ``epochs`` local epochs on the shard in ``data_yaml``.

    The learning rate goes linearly from ``lr0`` to ``lr0 x lrf`` over the epochs (the server's
    ``train.lr_schedule`` sets both each round; 1.0 keeps it constant). With a ``teacher``,
    Ultralytics' distillation adds its feature loss (weight ``distill_weight``, reported as
    ``dis_loss``); ``projector`` is the client's projector from its earlier rounds
    (``fl_client.distill``), and the result carries it on. With ``keep_momentum`` the optimiser
    starts from ``optimizer_state`` (the client's last round's, when it fits) instead of zero
    momentum, and the result carries the state it ended with.
    """
    timing = RoundTiming(setup=time.perf_counter())
    overrides = {
        "model": "fedyolo-global",  # unused: the trainer gets the model object
        "data": str(data_yaml),
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "nbs": batch,
        "lr0": lr0,
        "lrf": lrf,  # lr0 -> lr0 x lrf over the round's epochs: the server's schedule's share
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
    if teacher is not None:
        overrides["dis"] = distill_weight
    with lean_ultralytics():
        trainer = local_trainer_class()(
            model,
            overrides,
            timing,
            prox_mu,
            teacher,
            projector,
            optimizer_state if keep_momentum else None,
        )
        try:
            trainer.train()
        finally:
            if teacher is not None:
                strip_feature_hooks(model, teacher)
    trained, kept = trainer.model, None
    if teacher is not None and hasattr(trained, "student_model"):  # Ultralytics' wrapper
        from fl_client.distill import projector_state

        kept = projector_state(trained)
        trained = trained.student_model
    if trained is not model:  # the trainer only moves the same object between devices
        raise RuntimeError("Ultralytics trained another model object than the one received")
    model.to("cpu")
    return LocalResult(
        num_examples=trainer_examples(trainer),
        losses=trainer_losses(trainer),
        timing=timing,
        projector=kept,
        optimizer_state=optimizer_arrays(trainer.optimizer) if keep_momentum else None,
        optimizer_restored=trainer.optimizer_restored,
    )


def resolve_device(device: str) -> str:
    """``auto`` → ``0`` (first CUDA device) when CUDA is present, else ``cpu``."""
    if str(device) == "auto":
        return "0" if torch.cuda.is_available() else "cpu"
    return str(device)
