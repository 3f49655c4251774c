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
same way, and ``unpack()`` refuses a record of another layout.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fl_client.errors import ModelConfigError  # noqa: F401 - its old home, still importable
from fl_client.transport import WEIGHTS_KEY  # defined with the wire format; re-exported here

LOGGER = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent / "models"


def resolve_model_cfg(cfg: str) -> str:
    """Return a path or Ultralytics name for ``model.cfg``; raise a one-line error if unknown.

    Accepts a path to a yaml/.pt, a yaml shipped with fedyolo (``fedyolo-tiny.yaml``) or a yaml
    shipped with Ultralytics (``yolov8n.yaml``, ``yolo11s.yaml``, ``yolo26n.yaml``, ...). A
    ``.pt`` is opened weights-only and its architecture built here already
    (:func:`checkpoint_model`), so that a checkpoint that would run code, or holds no buildable
    model, stops the configuration before any work.
    """
    resolved = _located(cfg)
    if resolved.endswith(".pt"):
        checkpoint_model(resolved)
    return resolved


def _located(cfg: str) -> str:
    """``resolve_model_cfg`` without opening a checkpoint (``build_model`` opens it once)."""
    path = Path(cfg).expanduser()
    if path.is_file():
        return str(path.resolve())
    if (MODELS_DIR / cfg).is_file():
        return str(MODELS_DIR / cfg)
    if cfg.endswith(".pt"):
        raise ModelConfigError(
            f"model.cfg: checkpoint '{cfg}' not found (nothing is downloaded; give a local path)"
        )
    from fl_client.ultralytics_adapter import model_yaml

    try:
        model_yaml(cfg)
    except (FileNotFoundError, OSError) as e:
        raise ModelConfigError(
            f"model.cfg: '{cfg}' is not a file nor an Ultralytics model yaml "
            "(e.g. yolov8n.yaml, yolo11s.yaml, yolo26n.yaml, fedyolo-tiny.yaml)"
        ) from e
    return cfg


def build_model(
    cfg: str | dict, names: dict[int, str] | list[str], what: str = "model.cfg"
) -> torch.nn.Module:
    """Build a detection model with a head for ``len(names)`` classes, in float32.

    ``cfg`` is a model yaml (random init), a ``.pt`` checkpoint (fine-tuning) or an
    architecture dict (a model's ``.yaml``: what a client receives, so a client never loads a
    file the server names). A checkpoint is read weights-only
    (``fl_client.ultralytics_adapter.load_checkpoint``): a crafted ``.pt`` cannot run code, nor
    can an architecture, whatever its ``activation`` string says (built restricted). A
    checkpoint trained for another class count keeps every tensor whose shape still fits and
    re-initialises the rest of the head, as Ultralytics' own fine-tuning does. ``what`` (the
    setting that named the file) begins a refusal's one line.
    """
    from fl_client.ultralytics_adapter import detection_model, weights_only_ultralytics

    weights_only_ultralytics()  # no eval() of an architecture's strings, from any source
    names = dict(enumerate(names)) if isinstance(names, list) else dict(names)
    if isinstance(cfg, dict):
        model = detection_model(copy.deepcopy(cfg), len(names))
    elif (resolved := _located(cfg)).endswith(".pt"):
        model = checkpoint_model(resolved, len(names), what)
    else:
        model = detection_model(resolved, len(names))
    model.names = names
    model.nc = len(names)
    return model.float()


def checkpoint_model(path: str, nc: int | None = None, what: str = "model.cfg") -> torch.nn.Module:
    """A ``.pt``'s architecture built for ``nc`` classes (its own by default), with every
    tensor of the checkpoint whose shape fits.

    The file is read weights-only (``fl_client.ultralytics_adapter.load_checkpoint``) and the
    architecture it carries is built restricted (no ``eval`` of its strings, only model layers
    by name): one line (``ModelConfigError``, prefixed ``what``) when either refuses it.
    """
    from fl_client.ultralytics_adapter import detection_model, load_checkpoint

    weights, _ = load_checkpoint(path, what)  # turns restricted building on, too
    try:
        model = detection_model(weights.yaml, nc)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, SyntaxError) as e:
        why = " ".join(str(e).replace("ERROR ❌️", "").split())
        raise ModelConfigError(
            f"{what}: {path}: its architecture cannot be built without running code or "
            f"is not a model ({type(e).__name__}: {why})"
        ) from e
    model.load(weights, verbose=False)
    return model


def exchanged_keys(model: torch.nn.Module) -> list[str]:
    """Names of the state-dict entries that go over the wire (all floating-point tensors)."""
    return [k for k, v in model.state_dict().items() if v.dtype.is_floating_point]


def layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each exchanged tensor, in packing order."""
    state = model.state_dict()
    return [(k, tuple(state[k].shape)) for k in exchanged_keys(model)]


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
    h = hashlib.sha256()
    for k in sorted(record.keys()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(record[k].numpy(), dtype=np.float32).tobytes())
    return h.hexdigest()


def save_checkpoint(model: torch.nn.Module, path: Path, train_args: dict, extra: dict) -> Path:
    """Write an Ultralytics-format checkpoint: ``YOLO(path)`` loads it for predict/val/export
    (fedyolo itself reads it weights-only: ``fl_client.ultralytics_adapter.load_yolo``).

    The model is stored in float32 (Ultralytics' trainer stores an fp16 EMA), so evaluating the
    file gives exactly the metrics of the weights the federation produced.
    """
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


PARTS = ("bn", "backbone", "neck", "head")


def part_masks(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Boolean masks over the packed vector: which values belong to which part of the model.

    * ``bn``: every BatchNorm's weight, bias, running mean and running variance;
    * ``bn_stats``: the running mean and variance only (statistics, not trained parameters);
    * ``bn_mean`` / ``bn_var``: the running means, the running variances (the i-th value of one
      belongs to the same channel as the i-th value of the other);
    * ``params``: trained parameters (everything but ``bn_stats``);
    * ``backbone`` / ``neck`` / ``head``: layers of the yaml's ``backbone`` list, the layers of
      its ``head`` list before the detection layer, and the detection layer (``Detect``);
    * ``cls``: the detection layer's classification branch (``cv3``, ``one2one_cv3``).
    """
    layers = getattr(model, "model", None)
    nb = len(getattr(model, "yaml", {}).get("backbone", [])) if hasattr(model, "yaml") else 0
    n_layers = len(layers) if layers is not None else 0
    bn_prefixes = tuple(
        f"{name}." for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
    )
    param_names = {name for name, _ in model.named_parameters()}
    shapes = layout(model)
    total = sum(int(np.prod(s)) for _, s in shapes)
    masks = {
        k: np.zeros(total, dtype=bool)
        for k in (*PARTS, "bn_stats", "bn_mean", "bn_var", "params", "cls")
    }
    offset = 0
    for name, shape in shapes:
        sl = slice(offset, offset + int(np.prod(shape)))
        offset = sl.stop
        if name.startswith(bn_prefixes):
            masks["bn"][sl] = True
        if name in param_names:
            masks["params"][sl] = True
        else:
            masks["bn_stats"][sl] = True
            if name.endswith(".running_mean"):
                masks["bn_mean"][sl] = True
            elif name.endswith(".running_var"):
                masks["bn_var"][sl] = True
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1].isdigit() and n_layers:
            i = int(parts[1])
            part = "backbone" if i < nb else ("head" if i == n_layers - 1 else "neck")
            masks[part][sl] = True
            if part == "head" and parts[2] in ("cv3", "one2one_cv3"):
                masks["cls"][sl] = True
    return masks


def bn_spread(means: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``Σ w·(mean − mean̄)²`` per channel over the clients (rows of ``means``; ``w`` sums to 1):
    what ``bn_stats=pooled`` adds to the mean of the clients' running variances."""
    return np.tensordot(w, (means - np.tensordot(w, means, axes=1)) ** 2, axes=1)


def local_mask(model: torch.nn.Module, parts: list[str] | tuple[str, ...]) -> np.ndarray | None:
    """Union of the masks of ``parts`` (values a client keeps local), or None for no parts."""
    if not parts:
        return None
    unknown = sorted(set(parts).difference(PARTS))
    if unknown:
        raise ValueError(f"unknown model parts {unknown}; choose from {list(PARTS)}")
    masks = part_masks(model)
    out = np.zeros_like(masks["bn"])
    for p in parts:
        out |= masks[p]
    return out
