"""A tiny detector that already detects something, for the drift-guard tests.

A guard test needs a global model whose held-out mAP is clearly above zero before the poison
arrives; the tiny model trained from scratch for a few federated rounds is still at 0. So the
federation starts from a checkpoint trained centrally (Ultralytics, 30 epochs, ~50 s here) on
synthetic images of another seed than the federation's images (no overlap with its held-out set).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pretrained_fleet(tmp_path_factory) -> list[str]:
    """Overrides that start a federation from a pre-trained tiny model on a highway fleet."""
    from ultralytics import YOLO

    from fl_client.data import generate
    from fl_client.model import resolve_model_cfg

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
        seed=0,
        deterministic=True,
        project=str(root / "train"),
        name="tiny",
        exist_ok=True,
        verbose=False,
    )
    ckpt = Path(model.trainer.last)
    assert ckpt.is_file()
    return [
        f"model.cfg={ckpt}",
        f"data.path={fleet}",
        "train.imgsz=128",
        "data.server_val_fraction=0.3",
    ]
