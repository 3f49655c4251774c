"""A tiny detector that already detects something, for the drift-guard tests.

A guard test needs a global model whose held-out mAP is clearly above zero before the poison
arrives; the tiny model trained from scratch for a few federated rounds is still at 0. So the
federation starts from a checkpoint trained centrally (Ultralytics, 30 epochs, ~50 s on 2 cores)
on synthetic images of another seed than the federation's images (no overlap with its held-out
set).

How good that checkpoint is depends on the machine's floating-point path (another CPU's kernels
train another model from the same seed), so no guard test may assume a magnitude measured here.
The fixture measures the checkpoint's mAP50-95 on the fleet's images (none of which it trained
on) and sets the guard's absolute floor from it: half the starting mAP. Honest rounds of this
fleet moved the held-out mAP by up to ~22 % of the start; random weights collapse it to ~0, a
drop of ~100 %. The floor sits between the two on any machine. ``FEDYOLO_TEST_PRETRAIN_SEED``
trains the checkpoint from another seed: a cheap stand-in for another machine's numerics, to
check that the guard tests' assertions hold for a model other than the one they were written
against (the default, 0, is what CI runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FLOOR_OF_START = 0.5  # guard.min_abs_drop, as a fraction of the starting mAP50-95


@pytest.fixture(scope="session")
def pretrained_fleet(tmp_path_factory) -> list[str]:
    """Overrides that start a federation from a pre-trained tiny model on a highway fleet, with
    the guard's absolute floor derived from that model's starting mAP50-95."""
    from ultralytics import YOLO

    from fl_client.evaluate import evaluate_checkpoint
    from fl_client.model import resolve_model_cfg
    from fl_server.data import generate

    seed = int(os.environ.get("FEDYOLO_TEST_PRETRAIN_SEED", "0"))
    root = tmp_path_factory.mktemp("pretrained")
    pre = generate(root / "pretrain", 96, imgsz=128, seed=1, domains=["day"], class_mix="highway")
    fleet = generate(root / "fleet", 150, imgsz=128, seed=2, domains=["day"], class_mix="highway")
    model = YOLO(resolve_model_cfg("fedyolo-tiny.yaml"))
    model.train(
        data=str(pre),
        epochs=30,
        imgsz=128,
        batch=16,
        device="cpu",
        workers=0,
        val=False,
        plots=False,
        mosaic=0.0,
        optimizer="SGD",
        lr0=0.02,
        amp=False,
        seed=seed,
        deterministic=True,
        project=str(root / "train"),
        name="tiny",
        exist_ok=True,
        verbose=False,
    )
    ckpt = Path(model.trainer.last)
    assert ckpt.is_file()
    start = evaluate_checkpoint(
        ckpt, fleet, imgsz=128, batch=32, device="cpu", workdir=root / "start"
    )["map50_95"]
    # Not a magnitude test: a guard test needs a model that detects something to protect.
    assert start > 0, f"the pre-trained model detects nothing on the fleet ({start})"
    return [
        f"model.cfg={ckpt}",
        f"data.path={fleet}",
        "train.imgsz=128",
        "data.server_val_fraction=0.3",
        f"guard.min_abs_drop={FLOOR_OF_START * start:.6g}",
    ]
