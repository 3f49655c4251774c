"""Evaluate a detection checkpoint on a labelled split with Ultralytics' validator."""

from __future__ import annotations

import logging
from pathlib import Path

LOGGER = logging.getLogger(__name__)


def evaluate_checkpoint(
    checkpoint: Path,
    data_yaml: Path,
    *,
    imgsz: int,
    batch: int,
    device: str,
    workdir: Path,
    split: str = "val",
    rect: bool | None = None,
    keep_images: bool = False,
) -> dict:
    """mAP50, mAP50-95, precision, recall (and per class) of ``checkpoint`` on ``data_yaml``.

    Goes through ``YOLO(checkpoint).val()``: the numbers are the ones a user gets from the
    same file with Ultralytics' own tools. The checkpoint may be any format Ultralytics loads
    (``.pt``, ``.onnx``, ...); ``rect=False`` makes a ``.pt`` see the square letterboxed inputs
    an exported fixed-shape model sees. ``keep_images``: also each image's matches, under
    ``images`` (for the guard's paired bootstrap; not JSON). A ``.pt`` is loaded weights-only
    (``fl_client.ultralytics_adapter.load_yolo``): it never runs code.
    """
    from ultralytics import YOLO

    from fl_client.ultralytics_adapter import (
        keeping_validator,
        load_yolo,
        weights_only_ultralytics,
    )

    weights_only_ultralytics()  # whatever the format, nothing Ultralytics unpickles runs code
    if Path(checkpoint).suffix.lower() == ".pt":
        model = load_yolo(checkpoint, "evaluate")
    else:
        model = YOLO(str(checkpoint))
    metrics = model.val(
        **({"validator": keeping_validator()} if keep_images and model.task == "detect" else {}),
        data=str(data_yaml),
        split=split,
        imgsz=imgsz,
        batch=batch,
        device=device,
        plots=False,
        verbose=False,
        save_json=False,
        project=str(workdir),
        name="val",
        exist_ok=True,
        workers=0,
        **({} if rect is None else {"rect": rect}),
    )
    box = metrics.box
    names = metrics.names
    per_class = {}
    for i, c in enumerate(box.ap_class_index):
        per_class[names[int(c)]] = {
            "map50": float(box.all_ap[i, 0]),
            "map50_95": float(box.all_ap[i].mean()),
        }
    out = {
        "map50": float(box.map50),
        "map50_95": float(box.map),
        "precision": float(box.mp),
        "recall": float(box.mr),
        "per_class": per_class,
    }
    images = getattr(metrics, "fedyolo_images", None)
    if images is not None:
        out["images"] = images  # not JSON: the server's guard resamples it (fl_server.guard)
    return out
