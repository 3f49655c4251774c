"""The detection model and what of it goes over the wire.

Both the server and the clients build models here, so the architecture, the class count and
the exact set of tensors exchanged are defined once.

What is exchanged: every floating-point entry of the model's ``state_dict`` as float32 —
the parameters *and* the BatchNorm running statistics (``running_mean``/``running_var``), so
every client trains from, and the server evaluates, the same complete model. BatchNorm's
``num_batches_tracked`` counters are not exchanged: Ultralytics' BatchNorm layers use a fixed
momentum (0.03), so the counter is never read, and averaging integer counters across clients
would only produce a meaningless number. Each side keeps its own.

How: the tensors are packed, in state-dict order, into one float32 vector under the key
``weights``. Flower moves every array of a record as separate objects (plus 5 MB chunks), one
HTTP exchange each, on every hop of the deployment engine; YOLOv8n has ~300 tensors, so packing
turns ~700 transfers per message into ~5. Element-wise strategies (FedAvg, FedProx, FedAdam,
FedMedian, ...) are unaffected; ``layout()``/``unpack()`` give per-tensor views to those that
need names. The layout is fixed by the model cfg and class count, which both sides build the
same way; ``layout_digest()`` lets a client check that before loading.
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


WEIGHTS_KEY = "weights"


def layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each exchanged tensor, in packing order."""
    state = model.state_dict()
    return [(k, tuple(state[k].shape)) for k in exchanged_keys(model)]


def layout_digest(model: torch.nn.Module) -> str:
    """A short fingerprint of ``layout(model)``: equal digests mean compatible records."""
    import hashlib

    return hashlib.sha256(repr(layout(model)).encode()).hexdigest()[:16]


def to_record(model: torch.nn.Module) -> ArrayRecord:
    """Model → ArrayRecord holding one float32 vector of every exchanged tensor."""
    state = model.state_dict()
    flat = torch.cat(
        [state[k].detach().reshape(-1).to("cpu", torch.float32) for k in exchanged_keys(model)]
    )
    return ArrayRecord({WEIGHTS_KEY: Array(flat.numpy())})


def unpack(record: ArrayRecord, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Per-tensor views (no copy) of a packed record, given ``layout(model)``."""
    if list(record.keys()) != [WEIGHTS_KEY]:
        raise ValueError(
            f"weights do not match the model: expected one array '{WEIGHTS_KEY}', "
            f"got {sorted(record.keys())[:3]}"
        )
    flat = record[WEIGHTS_KEY].numpy().reshape(-1)
    expected = sum(int(np.prod(shape)) for _, shape in shapes)
    if flat.size != expected:
        raise ValueError(
            f"weights do not match the model: {flat.size} values, the model has {expected}"
        )
    views, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        views[name] = flat[offset : offset + n].reshape(shape)
        offset += n
    return views


def load_record(model: torch.nn.Module, record: ArrayRecord) -> None:
    """Copy a packed ArrayRecord into ``model`` in place.

    Raises ``ValueError`` when the record does not hold exactly this model's tensors, so a reply
    from another architecture or class count can never be half-loaded.
    """
    views = unpack(record, layout(model))
    state = model.state_dict()
    with torch.no_grad():
        for name, arr in views.items():
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))


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
