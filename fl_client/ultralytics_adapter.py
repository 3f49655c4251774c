"""Everything fedyolo does to Ultralytics' trainer, and every Ultralytics internal it relies on.

``local_trainer_class()`` is ``DetectionTrainer`` with fedyolo's federated changes (see
``fl_client.train``); ``lean_ultralytics()`` keeps Ultralytics' integrations out of a client's
round; ``load_checkpoint()`` and ``load_yolo()`` are the one way fedyolo opens a ``.pt``
(weights-only: a checkpoint never runs code, whichever command loads it). The mAP from kept
matches (``ap_per_threshold``, ``keeping_validator``: the server's guard), the edge's
``letterbox``, a dataset's validation folder (``val_images``), building a model
(``detection_model``, ``model_yaml``), a distillation pair's ``feature_levels`` and what a
trained trainer reports (``trainer_losses``, ``trainer_examples``) go through here too. Uses of
private Ultralytics internals are marked PRIVATE here and nowhere else;
``tests/fl_client/test_ultralytics_adapter.py`` and ``tests/fl_server/test_library_adapters.py``
fail, naming the assumption, when an upgrade breaks one (the latter also fails when a module
outside the adapters imports a private module).
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_client.errors import ModelConfigError


@functools.cache
def local_trainer_class() -> type:
    """Build the trainer subclass lazily, so importing fedyolo does not import Ultralytics."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    class LocalTrainer(DetectionTrainer):
        def __init__(
            self,
            model: torch.nn.Module,
            overrides: dict[str, Any],
            timing: Any,  # fl_client.train.RoundTiming
            prox_mu: float = 0.0,
            teacher: torch.nn.Module | None = None,
            projector: dict | None = None,
            optimizer_state: dict | None = None,
        ):
            super().__init__(overrides=overrides)
            self.model = model
            self.timing = timing
            self.prox_mu = prox_mu
            self.prox_ref: list[torch.Tensor] | None = None
            # distillation: Ultralytics wraps self.model in its DistillationModel when
            # args.distill_model is set; it takes a path or a module (fl_client.distill)
            self.args.distill_model = teacher
            self.projector = projector  # the client's projector from its earlier rounds
            self.optimizer_state = optimizer_state  # train.keep_momentum: its last round's
            self.optimizer_restored = False
            self.add_callback("on_train_start", self._on_train_start)
            self.add_callback("on_train_epoch_start", self._on_epoch_start)
            self.add_callback("on_train_epoch_end", self._on_epoch_end)
            self.add_callback("on_train_batch_start", self._on_batch_start)
            self.add_callback("on_train_batch_end", self._on_batch_end)

        # --- timing -------------------------------------------------------------------------
        @staticmethod
        def _on_train_start(trainer: Any) -> None:
            trainer.timing.setup = time.perf_counter() - trainer.timing.setup
            if trainer.projector and hasattr(trainer.model, "projector"):
                # in place: the optimiser already holds these parameters
                trainer.projector_restored = load_projector(trainer.model, trainer.projector)
            if trainer.optimizer_state:  # after the optimiser is built, before its first step
                trainer.optimizer_restored = load_optimizer_arrays(
                    trainer.optimizer, trainer.optimizer_state
                )
            if trainer.prox_mu > 0:  # the global weights, on the training device
                trainer.prox_ref = [p.detach().clone() for p in trainer.model.parameters()]

        # --- FedProx ------------------------------------------------------------------------
        def optimizer_step(self) -> None:
            """Ultralytics' own step, with FedProx's proximal term added to the gradient first.

            The local objective becomes L(w) + µ/2·‖w − w_global‖² (Li et al., 2020). Ultralytics'
            detection loss is the *sum* over the batch (mean loss × batch size), so the term's
            gradient is µ·B·(w − w_global): µ keeps its meaning relative to the per-image loss.
            The gradients are still AMP-scaled here, so the term is scaled the same way
            (``GradScaler.get_scale()``, 1.0 without AMP); Ultralytics' step then un-scales and
            clips both together as one gradient. Nothing of Ultralytics' step is copied.
            """
            if self.prox_mu > 0 and self.prox_ref is not None:
                scale = self.prox_mu * self.batch_size * float(self.scaler.get_scale())
                with torch.no_grad():
                    for p, ref in zip(self.model.parameters(), self.prox_ref, strict=True):
                        if p.grad is not None:
                            p.grad.add_(p.detach() - ref, alpha=scale)
            super().optimizer_step()

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
            # PRIVATE: BaseTrainer._clear_memory(threshold), called around every epoch. On CPU
            # there is no accelerator memory to free; its gc.collect() costs ~0.4 s per call in
            # a process holding torch and Flower (tests/fl_client/test_ultralytics_adapter.py).
            if self.device.type != "cpu":
                super()._clear_memory(threshold)

    return LocalTrainer


def load_projector(model: torch.nn.Module, saved: dict[str, np.ndarray]) -> bool:
    """Put a client's distillation projector back when it fits this student/teacher pair;
    False otherwise.

    PRIVATE: ``DistillationModel.projector``, the module Ultralytics' distillation trains beside
    the student (``fl_client.distill`` keeps it between rounds). Checked by
    tests/fl_server/test_library_adapters.py.
    """
    own = model.projector.state_dict()
    if set(saved) != set(own) or any(saved[k].shape != tuple(own[k].shape) for k in own):
        return False
    model.projector.load_state_dict({k: torch.from_numpy(v) for k, v in saved.items()})
    return True


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_arrays(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """The optimiser's per-parameter state (SGD's momentum buffers, Adam's moments and step) as
    arrays named ``<index>.<name>``, the index being the parameter's place in the optimiser's
    groups: Ultralytics builds the same groups in the same order from the same model every round
    (``BaseTrainer.build_optimizer``), so :func:`load_optimizer_arrays` can put them back."""
    return {
        f"{i}.{name}": value.detach().cpu().numpy().copy()
        for i, p in enumerate(_optimizer_params(optimizer))
        for name, value in optimizer.state.get(p, {}).items()
        if torch.is_tensor(value)
    }


def load_optimizer_arrays(optimizer: torch.optim.Optimizer, saved: dict[str, np.ndarray]) -> bool:
    """Put :func:`optimizer_arrays`'s arrays back into a freshly built optimiser; False (nothing
    changed) when they do not fit its parameters (another model, another optimiser) or hold a
    NaN or an infinity (a diverged round: kept, it would spoil every later round)."""
    params = _optimizer_params(optimizer)
    fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params) or not name:
            return False
        p = params[int(index)]
        if (value.ndim and tuple(value.shape) != tuple(p.shape)) or not np.isfinite(value).all():
            return False
        # a step count (0-d) lives on the CPU unless the optimiser is fused or capturable
        device = p.device if value.ndim or fused else torch.device("cpu")
        tensor = torch.from_numpy(np.array(value, dtype=np.float32)).to(device)
        state.setdefault(p, {})[name] = tensor
    names = {frozenset(s) for s in state.values()}
    if len(names) > 1:  # every parameter with state has the same kinds of state
        return False
    for p, values in state.items():
        optimizer.state[p].update(values)
    return True


def strip_feature_hooks(*models: torch.nn.Module) -> None:
    """Take Ultralytics' distillation hooks off ``models`` (the student, the teacher).

    PRIVATE: ``DistillationModel`` registers a ``FeatureHook`` (public class) in each feature
    layer's ``_forward_hooks`` (torch's hook table) of both models and never removes them; they
    keep the last batch's features. On a client that keeps its model between rounds, the next
    training deep-copies the model for its EMA, and deep-copying those non-leaf feature tensors
    fails. Removed after every distillation round, whatever happened in it.
    """
    from ultralytics.nn.distill_model import FeatureHook

    for model in models:
        for m in model.modules():
            for handle_id, hook in list(m._forward_hooks.items()):
                if isinstance(hook, FeatureHook):
                    del m._forward_hooks[handle_id]


@contextlib.contextmanager
def lean_ultralytics() -> Iterator[None]:
    """Scope in which Ultralytics' trainer registers no integration callbacks.

    Ultralytics adds its integration callbacks (ClearML, TensorBoard, W&B, Hub, ...) and fires
    ``on_pretrain_routine_start`` inside ``BaseTrainer.__init__``, before a subclass could remove
    them; replacing the registration function for the duration of the round is the only way to
    keep e.g. its ClearML callback from initialising on every client.

    PRIVATE: ``ultralytics.utils.callbacks.add_integration_callbacks``, looked up by
    ``BaseTrainer.__init__`` at call time. Checked by tests/fl_client/test_ultralytics_adapter.py.
    """
    from ultralytics.utils import callbacks

    saved = callbacks.add_integration_callbacks
    callbacks.add_integration_callbacks = lambda instance: None
    try:
        yield
    finally:
        callbacks.add_integration_callbacks = saved


def weights_only_ultralytics() -> None:
    """From now on, every Ultralytics load and model build in this process is weights-only.

    Ultralytics loads a ``.pt`` with full unpickling unless ``ULTRALYTICS_SAFE_LOAD`` is set
    (``torch_safe_load(safe_only=None)``), and builds a model from a yaml by ``eval``-ing its
    ``activation`` string unless a restricted load is in progress (``parse_model``): a
    checkpoint's or a client's architecture dict could run code either way. A one-way switch,
    so no thread can turn it off under another's load.

    PRIVATE: ``ultralytics.nn.tasks.SAFE_LOAD``, the module global both ``torch_safe_load``
    and ``_SafeLoad.restricted()`` read at call time (the environment variable is read once,
    at import). Checked by tests/fl_client/test_ultralytics_adapter.py.
    """
    from ultralytics.nn import tasks

    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # torch < 2.6
        raise ModelConfigError(
            f"torch {torch.__version__} cannot load checkpoints weights-only with Ultralytics' "
            "allow-list (it needs torch >= 2.6): upgrade torch"
        )
    tasks.SAFE_LOAD = True


def load_checkpoint(path: str | Path, what: str) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model (its EMA when it has one) in float32, and the checkpoint dict.

    Weights-only: torch's restricted unpickler with Ultralytics' allow-list of torch and
    Ultralytics model classes. A file that is not such a checkpoint (it would run code, or it
    is damaged, or it holds no model) raises ``ModelConfigError``: one line, prefixed ``what``
    (``model.cfg``, ``export``, ...), naming the file.
    """
    from ultralytics.nn.tasks import torch_safe_load

    weights_only_ultralytics()
    path = Path(path)
    if not path.is_file():
        raise ModelConfigError(f"{what}: checkpoint {path} not found")
    try:
        ckpt, _ = torch_safe_load(str(path), safe_only=True)
    except (TypeError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ModelConfigError(f"{what}: {_refusal(path, e)}") from e
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, torch.nn.Module):
        raise ModelConfigError(f"{what}: {path} holds no Ultralytics model")
    return model.float(), ckpt


def load_yolo(path: str | Path, what: str):
    """``ultralytics.YOLO`` of a ``.pt``, loaded weights-only: it predicts, validates and
    exports like ``YOLO(path)``. Refused as :func:`load_checkpoint` refuses."""
    from ultralytics import YOLO

    load_checkpoint(path, what)  # the one-line refusals; then Ultralytics' own set-up
    return YOLO(str(path))  # weights-only too: weights_only_ultralytics() is on


def _refusal(path: Path, e: BaseException) -> str:
    """One line for a file Ultralytics' weights-only loading refused."""
    cause = e.__cause__ or e
    if isinstance(cause, pickle.UnpicklingError):  # torch's restricted unpickler said no
        text = str(cause)
        found = re.search(r"(?i)unsupported (?:global: )?GLOBAL ([\w.]+)", text)
        operand = re.search(r"Unsupported operand (\d+)", text)
        why = (
            f" (it names {found.group(1)})"
            if found
            else f" (pickle instruction {operand.group(1)} is not allowed)"
            if operand
            else ""
        )
        return (
            f"{path} is not a weights-only checkpoint{why}: refused to unpickle code "
            "(use a checkpoint written by fedyolo or Ultralytics)"
        )
    if "TorchScript" in str(e):
        return f"{path} is a TorchScript archive, not an Ultralytics checkpoint"
    if isinstance(e, TypeError):  # Ultralytics' word for a damaged file
        return f"{path} is not a loadable checkpoint (empty, truncated or not from torch.save)"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{path} cannot be read as a checkpoint ({type(e).__name__}: {first})"


def ap_per_threshold(
    tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray
) -> np.ndarray:
    """Average precision per class with targets (rows) at each IoU threshold (columns, 0.50 to
    0.95), as Ultralytics' validator computes it from its matches.

    PRIVATE: ``ultralytics.utils.metrics.ap_per_class`` returns a 12-tuple and the AP array is
    its element 5. Checked by tests/fl_server/test_library_adapters.py.
    """
    from ultralytics.utils.metrics import ap_per_class

    return ap_per_class(tp, conf, pred_cls, target_cls)[5]


def keeping_validator() -> type:
    """Ultralytics' detection validator, keeping what each image contributed to the mAP (its
    predictions' IoU matches, confidences and classes, and its targets' classes) before the
    validator concatenates and clears them: the guard resamples images from it to tell a real
    drop from the held-out set's noise (``fl_server.guard``).

    PRIVATE: ``DetectionValidator.get_stats`` consumes and clears ``self.metrics.stats``, a dict
    of per-batch lists under ``tp``, ``conf``, ``pred_cls`` and ``target_cls``; the dataset's
    ``im_files`` name the images in order. Checked by tests/fl_server/test_library_adapters.py.
    """
    from ultralytics.models.yolo.detect import DetectionValidator

    class KeepingValidator(DetectionValidator):
        def get_stats(self):
            st = self.metrics.stats
            files = list(getattr(self.dataloader.dataset, "im_files", []))[: len(st["tp"])]
            self.metrics.fedyolo_images = {
                "names": [Path(f).name for f in files],
                **{k: list(st[k]) for k in ("tp", "conf", "pred_cls", "target_cls")},
            }
            return super().get_stats()

    return KeepingValidator


def letterbox(image: np.ndarray, imgsz: int) -> np.ndarray:
    """``image`` (HWC) resized and padded to ``imgsz`` x ``imgsz`` as Ultralytics' predictor
    does for an exported model (``auto=False``: no stride-minimal padding).

    PRIVATE: ``ultralytics.data.augment.LetterBox`` and its ``image=`` call. Checked by
    tests/fl_server/test_library_adapters.py.
    """
    from ultralytics.data.augment import LetterBox

    return LetterBox((imgsz, imgsz), auto=False, scaleup=True)(image=image)


def model_yaml(cfg: str) -> dict:
    """The model dict of an Ultralytics model yaml (a file, or a name Ultralytics ships, e.g.
    ``yolov8n.yaml``, its scale read from the name); ``FileNotFoundError`` when there is none.

    PRIVATE: ``ultralytics.nn.tasks.yaml_model_load``. Checked by
    tests/fl_server/test_library_adapters.py.
    """
    from ultralytics.nn.tasks import yaml_model_load

    return yaml_model_load(cfg)


def detection_model(cfg: dict | str, nc: int | None) -> torch.nn.Module:
    """An Ultralytics detection model from a model yaml (a file, or a name Ultralytics ships) or
    an architecture dict, with a head for ``nc`` classes (the architecture's own when None).

    PRIVATE: ``ultralytics.nn.tasks.DetectionModel(cfg, nc=..., verbose=False)``, the module
    ``YOLO`` wraps (fedyolo trains and averages the bare module). Built restricted (no ``eval``
    of the architecture's strings) once :func:`weights_only_ultralytics` is on. Checked by
    tests/fl_server/test_library_adapters.py.
    """
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(cfg, nc=nc, verbose=False)


def feature_levels(model: torch.nn.Module) -> int:
    """How many feature levels the model's detection head reads (3 for YOLOv8): Ultralytics'
    distillation pairs a teacher's with a student's level by level.

    PRIVATE: ``DistillationModel.get_distill_layers`` (the head's input layers, then the head
    itself). Checked by tests/fl_server/test_library_adapters.py.
    """
    from ultralytics.nn.distill_model import DistillationModel

    return len(DistillationModel.get_distill_layers(model)) - 1


def quiet_ultralytics(level: str) -> None:
    """Ultralytics' own logger at ``level`` (a ``logging`` level name; WARNING if unknown)."""
    import logging

    from ultralytics.utils import LOGGER as UL_LOGGER

    UL_LOGGER.setLevel(getattr(logging, level, logging.WARNING))


def val_images(data_yaml: Path) -> Path:
    """The validation images' folder of a ``data.yaml``, resolved as Ultralytics resolves it.

    PRIVATE: ``ultralytics.data.utils.check_det_dataset`` (its ``val`` key, a path).
    """
    from ultralytics.data.utils import check_det_dataset

    return Path(check_det_dataset(str(data_yaml))["val"])


def trainer_losses(trainer: Any) -> dict[str, float]:
    """A trained trainer's mean losses of its last epoch by name (``box_loss``, ``cls_loss``,
    ``dfl_loss``, and ``dis_loss`` when distilling); none where no batch ran.

    PRIVATE: ``BaseTrainer.tloss``, the running mean (a dict by name; in older releases a tensor
    named by ``BaseTrainer.loss_names``). Checked by ``tests/fl_server/test_library_adapters.py``.
    """
    tloss = trainer.tloss
    if tloss is None:
        return {}
    if isinstance(tloss, dict):
        return {k: float(v) for k, v in tloss.items()}
    return dict(zip(trainer.loss_names, [float(x) for x in tloss], strict=False))


def trainer_examples(trainer: Any) -> int:
    """How many training images a trained trainer's loader held (the client's example count).

    PRIVATE: ``BaseTrainer.train_loader.dataset`` (an Ultralytics dataset with a length), set up
    by ``_setup_train``. Checked by ``tests/fl_server/test_library_adapters.py``.
    """
    return len(trainer.train_loader.dataset)
