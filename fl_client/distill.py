"""Federated knowledge distillation: the teacher on the wire once, cached on each client.

With ``distill.teacher=runs/<run>/best.pt`` every client trains the (small) global student with
Ultralytics' own distillation (``DistillationModel``: a projector per detection level and a
class-score-weighted feature loss against the frozen teacher, weight ``distill.weight``, its
``dis``) on its own images. What fedyolo adds is how the teacher reaches a client:

* **Once.** The server sends the teacher (architecture as JSON + one packed float32 vector, the
  global model's wire format: nothing is unpickled) in a node's first train message only, and
  again only after that node failed a round (it may have lost its cache). Every round's config
  carries just the teacher's sha256 (``RoundConfig.teacher_sha256``).
* **Cached by its sha256**, in the process (the warm worker, a simulation actor) and on disk
  (``$XDG_CACHE_HOME/fedyolo/teachers/<sha256>.npz``, read with ``allow_pickle=False``), and
  checked against the sha256 on every load: a teacher that is not the one the server named is
  never used.
* **Never trained, never aggregated**: Ultralytics freezes it; the reply carries the student only.

**The projectors stay on each client**, in its Flower ``context.state``, carried from round to
round. They are training scaffolding (not part of the student that is deployed), sized by the
teacher's channels: for YOLOv8n ← YOLOv8s they are 0.5 M parameters, 17% on top of the 3 M
student on every reply if aggregated. Each one maps the shared student's features to the same
teacher, so a client's own continues to fit the next round's global student.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fl_client.wire import TEACHER_ARCH_KEY, TEACHER_KEY  # the message keys: the contract

LOGGER = logging.getLogger(__name__)

_MEMORY: dict[str, Any] = {}  # sha256 -> built teacher model (one at a time)


def digest(arch: str, packed: np.ndarray) -> str:
    """The teacher's identity: sha256 over its architecture JSON and its float32 weights."""
    h = hashlib.sha256(arch.encode())
    h.update(np.ascontiguousarray(packed, dtype=np.float32).tobytes())
    return h.hexdigest()


def teacher_records(model) -> tuple[str, dict[str, Any]]:
    """(sha256, content records) that carry ``model`` as a teacher."""
    from fl_client.model import WEIGHTS_KEY, to_record

    arch = json.dumps(model.yaml, sort_keys=True)
    packed = to_record(model)[WEIGHTS_KEY].numpy().reshape(-1)
    sha = digest(arch, packed)
    return sha, {
        TEACHER_KEY: ArrayRecord({WEIGHTS_KEY: Array(packed)}),
        TEACHER_ARCH_KEY: ConfigRecord({"arch": arch, "sha256": sha}),
    }


def cache_dir() -> Path:
    from fl_client.data.formats import user_cache_dir

    return user_cache_dir() / "teachers"


def _build(arch: str, packed: np.ndarray, names: list[str]):
    from fl_client.model import WEIGHTS_KEY, build_model, load_record

    model = build_model(json.loads(arch), names)
    load_record(model, ArrayRecord({WEIGHTS_KEY: Array(packed.astype(np.float32))}))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_for(sha: str, content: Any, names: list[str]):
    """The teacher named by ``sha``: from this message, or this client's caches.

    Raises ``ValueError`` when the message's teacher is not the one named, and
    ``FileNotFoundError`` when it is neither in the message nor cached (the server resends it
    after a failed round).
    """
    from fl_client.model import WEIGHTS_KEY

    if not sha:
        return None
    if TEACHER_KEY in content.array_records:
        arch = str(content.config_records[TEACHER_ARCH_KEY]["arch"])
        packed = content.array_records[TEACHER_KEY][WEIGHTS_KEY].numpy().reshape(-1)
        got = digest(arch, packed)
        if got != sha:
            raise ValueError(f"distillation teacher: received sha256 {got[:12]}, named {sha[:12]}")
        _MEMORY.clear()
        _MEMORY[sha] = _build(arch, packed, names)
        _store(sha, arch, packed)
        return _MEMORY[sha]
    if sha in _MEMORY:
        return _MEMORY[sha]
    path = cache_dir() / f"{sha}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            arch, packed = str(f["arch"]), f["weights"]
        if digest(arch, packed) == sha:
            _MEMORY.clear()
            _MEMORY[sha] = _build(arch, packed, names)
            return _MEMORY[sha]
        LOGGER.warning("distillation teacher cache %s does not match its sha256: ignored", path)
    raise FileNotFoundError(
        f"distillation teacher {sha[:12]} is not cached on this client (the server sends it "
        "again in this client's next round)"
    )


def _store(sha: str, arch: str, packed: np.ndarray) -> None:
    """Keep the teacher on disk for the next process (atomic; a failure only costs a resend)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{sha}.{os.getpid()}.npz"
        np.savez(tmp, arch=np.array(arch), weights=packed)
        tmp.replace(folder / f"{sha}.npz")
        for old in folder.glob("*.npz"):  # one teacher per client: the current one
            if old.name != f"{sha}.npz":
                old.unlink(missing_ok=True)
    except OSError as e:
        LOGGER.warning("distillation teacher not cached on disk (%s): it is sent again", e)


def projector_state(model) -> dict[str, np.ndarray]:
    """A DistillationModel's projector weights, for the client's own state."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.projector.state_dict().items()}


def load_teacher(path: str | Path, names: list[str], student):
    """The teacher checkpoint as a model, checked against the federation it teaches.

    Read weights-only (``fl_client.ultralytics_adapter.load_checkpoint``). Refused with one
    line (``ModelConfigError``) when it is not a weights-only checkpoint, its classes are not
    the federation's, or its detection head has another number of feature levels than the
    student's (Ultralytics' distillation pairs them level by level).
    """
    from fl_client.model import ModelConfigError, build_model
    from fl_client.ultralytics_adapter import feature_levels, load_checkpoint

    path = Path(path).expanduser()
    if not path.is_file() or path.suffix != ".pt":
        raise ModelConfigError(f"distill.teacher: '{path}' is not a .pt checkpoint")
    weights, _ = load_checkpoint(path, "distill.teacher")
    theirs = [str(v) for _, v in sorted(dict(getattr(weights, "names", {}) or {}).items())]
    if theirs != [str(n) for n in names]:
        raise ModelConfigError(
            f"distill.teacher: '{path}' detects {theirs}, the federation trains {list(names)}"
        )
    teacher = build_model(str(path), list(names), "distill.teacher")
    t_levels = feature_levels(teacher)
    s_levels = feature_levels(student)
    if t_levels != s_levels:
        raise ModelConfigError(
            f"distill.teacher: its head has {t_levels} feature levels, the student's "
            f"{s_levels} (Ultralytics distils level by level: pair e.g. yolov8n with yolov8s)"
        )
    teacher.eval()
    return teacher
