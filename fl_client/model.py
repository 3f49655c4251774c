"""The detection model and what of it goes over the wire.

Both the server and the clients build models here, so the architecture, the class count and
the exact set of tensors exchanged are defined once.

What is exchanged: every floating-point entry of the model's ``state_dict`` as float32 —
the parameters *and* the BatchNorm running statistics (``running_mean``/``running_var``), so
every client trains from, and the server evaluates, the same complete model. BatchNorm's
``num_batches_tracked`` counters are not exchanged: Ultralytics' BatchNorm layers use a fixed
momentum (0.03), so the counter is never read, and averaging integer counters across clients
would only produce a meaningless number. Each side keeps its own.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

LOGGER = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent / "models"


class ModelConfigError(ValueError):
    """The configured model cannot be found or built."""


def resolve_model_cfg(cfg: str) -> str:
    """Return a path or Ultralytics name for ``model.cfg``; raise a one-line error if unknown.

    Accepts a path to a yaml/.pt, a yaml shipped with fedyolo (``fedyolo-tiny.yaml``) or a yaml
    shipped with Ultralytics (``yolov8n.yaml``, ``yolo11s.yaml``, ``yolo26n.yaml``, ...).
    """
    path = Path(cfg).expanduser()
    if path.is_file():
        return str(path.resolve())
    if (MODELS_DIR / cfg).is_file():
        return str(MODELS_DIR / cfg)
    if cfg.endswith(".pt"):
        raise ModelConfigError(
            f"model.cfg: checkpoint '{cfg}' not found (nothing is downloaded; give a local path)"
        )
    from ultralytics.nn.tasks import yaml_model_load

    try:
        yaml_model_load(cfg)
    except (FileNotFoundError, OSError) as e:
        raise ModelConfigError(
            f"model.cfg: '{cfg}' is not a file nor an Ultralytics model yaml "
            "(e.g. yolov8n.yaml, yolo11s.yaml, yolo26n.yaml, fedyolo-tiny.yaml)"
        ) from e
    return cfg


def build_model(cfg: str, names: dict[int, str] | list[str]) -> torch.nn.Module:
    """Build a detection model with a head for ``len(names)`` classes, in float32.

    ``cfg`` is a model yaml (random init) or a ``.pt`` checkpoint (fine-tuning); a checkpoint
    trained for another class count keeps every tensor whose shape still fits and re-initialises
    the rest of the head, as Ultralytics' own fine-tuning does.
    """
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    names = dict(enumerate(names)) if isinstance(names, list) else dict(names)
    resolved = resolve_model_cfg(cfg)
    if resolved.endswith(".pt"):
        weights, _ = load_checkpoint(resolved)
        model = DetectionModel(weights.yaml, nc=len(names), verbose=False)
        model.load(weights, verbose=False)
    else:
        model = DetectionModel(resolved, nc=len(names), verbose=False)
    model.names = names
    model.nc = len(names)
    return model.float()


def exchanged_keys(model: torch.nn.Module) -> list[str]:
    """Names of the state-dict entries that go over the wire (all floating-point tensors)."""
    return [k for k, v in model.state_dict().items() if v.dtype.is_floating_point]


def to_record(model: torch.nn.Module) -> ArrayRecord:
    """Model → ArrayRecord of float32 arrays, in state-dict order."""
    state = model.state_dict()
    return ArrayRecord(
        {k: Array(state[k].detach().cpu().to(torch.float32).numpy()) for k in exchanged_keys(model)}
    )


def load_record(model: torch.nn.Module, record: ArrayRecord) -> None:
    """Copy an ArrayRecord into ``model`` in place; it must hold exactly the exchanged keys.

    Raises ``ValueError`` naming the first missing, unexpected or mis-shaped entry, so a reply
    from another architecture or class count can never be half-loaded.
    """
    expected = exchanged_keys(model)
    got = set(record.keys())
    missing = [k for k in expected if k not in got]
    extra = sorted(got.difference(expected))
    if missing or extra:
        raise ValueError(
            f"weights do not match the model: {len(missing)} missing (e.g. {missing[:1]}), "
            f"{len(extra)} unexpected (e.g. {extra[:1]})"
        )
    state = model.state_dict()
    with torch.no_grad():
        for k in expected:
            arr = record[k].numpy()
            if tuple(arr.shape) != tuple(state[k].shape):
                raise ValueError(
                    f"weights do not match the model: '{k}' has shape {tuple(arr.shape)}, "
                    f"the model expects {tuple(state[k].shape)}"
                )
            state[k].copy_(torch.from_numpy(np.ascontiguousarray(arr)))


def record_digest(record: ArrayRecord) -> str:
    """sha256 over the record's keys and float32 bytes: identifies a global model exactly."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(record.keys()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(record[k].numpy(), dtype=np.float32).tobytes())
    return h.hexdigest()


def record_is_finite(record: ArrayRecord) -> bool:
    """True when every value in the record is finite."""
    return all(np.isfinite(record[k].numpy()).all() for k in record)


def save_checkpoint(model: torch.nn.Module, path: Path, train_args: dict, extra: dict) -> Path:
    """Write an Ultralytics-format checkpoint: ``YOLO(path)`` loads it for predict/val/export.

    The model is stored in float32 (Ultralytics' trainer stores an fp16 EMA), so evaluating the
    file gives exactly the metrics of the weights the federation produced.
    """
    import copy
    from datetime import datetime

    from ultralytics import __version__

    path.parent.mkdir(parents=True, exist_ok=True)
    stored = copy.deepcopy(model).float().cpu()
    for p in stored.parameters():
        p.requires_grad_(False)
    ckpt = {
        "date": datetime.now().isoformat(),
        "version": __version__,
        "epoch": -1,
        "best_fitness": None,
        "model": stored,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": {"task": "detect", **train_args},
        "fedyolo": extra,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a checkpoint
    return path
