"""The work of one message: what a client does with a ``train`` or ``evaluate`` message's content.

``handle(kind, content, node, state)`` is the same call whether the message arrived in this
process (``fl_client.client_app``, Flower's glue) or in the node's warm worker
(``fl_client.worker``); both import it from here, so neither imports the other's module back.
This module imports only Flower and numpy at its head: torch and Ultralytics are imported by the
work itself, so the per-message ``flwr-clientapp`` process that only hands a message over to the
warm worker starts in well under a second.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fl_client import wire
from fl_client.lazy import lazy
from fl_client.memory import peak_rss_mib
from fl_client.wire import RoundConfig

torch = lazy("torch")

LOGGER = logging.getLogger("fl_client.client_app")  # the name operators filter on, as before

_MODEL_CACHE: dict[tuple, object] = {}
_WORKDIR: Path | None = None


def _workdir() -> Path:
    """This message's scratch folder (trainer output, a fault's shard copy); removed after it."""
    global _WORKDIR
    if _WORKDIR is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="fedyolo-client-"))
    return _WORKDIR


def _clear_workdir() -> None:
    global _WORKDIR
    if _WORKDIR is not None:
        shutil.rmtree(_WORKDIR, ignore_errors=True)
        _WORKDIR = None


def shard_yaml(node: Mapping, config: RoundConfig) -> Path:
    """The ``data.yaml`` of this client's shard, from its node config (see module docstring)."""
    from fl_client.data.formats import read_data_yaml

    if "data-path" in node and str(node["data-path"]):
        path = Path(str(node["data-path"]))
    else:
        if wire.PARTITION_ID not in node:
            raise ValueError("node config has neither 'data-path' nor 'partition-id'")
        path = Path(config.data_root) / f"client_{int(node[wire.PARTITION_ID])}" / "data.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"client data: '{path}' does not exist")
    names = read_data_yaml(path).names
    if list(config.names) and names != list(config.names):
        raise ValueError(
            f"client data: '{path}' has classes {names}, the federation trains {list(config.names)}"
        )
    return path


def _model_for(config: RoundConfig, received: ArrayRecord):
    """The process's cached model for this architecture, loaded with the received weights."""
    from fl_client.model import build_model, load_record

    key = (config.model_arch, config.names)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = build_model(json.loads(config.model_arch), list(config.names))
    model = _MODEL_CACHE[key]
    load_record(model, received)
    return model


def _setup_process(config: RoundConfig) -> None:
    if config.threads > 0 and torch.get_num_threads() != config.threads:
        torch.set_num_threads(config.threads)
    from fl_client.ultralytics_adapter import quiet_ultralytics

    quiet_ultralytics("WARNING")


STATE_KEY = "fedyolo"  # this client's own arrays in its Flower context.state
PROJECTOR = "projector."  # ... its distillation projector's tensors, by this prefix
OPTIMIZER = "optimizer."  # ... its optimiser's state (train.keep_momentum), by this prefix


def _own_state(state: RecordDict) -> dict[str, np.ndarray]:
    """What this client kept from earlier rounds (its Flower ``context.state``): its local parts
    and transport residual."""
    if STATE_KEY not in state:
        return {}
    rec = state[STATE_KEY]
    return {k: rec[k].numpy() for k in rec}


def _prefixed(own: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays of ``own`` under ``prefix``, the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in own.items() if k.startswith(prefix)}


def _keep_own(state: RecordDict, arrays: dict[str, np.ndarray]) -> None:
    state[STATE_KEY] = ArrayRecord({k: Array(v) for k, v in arrays.items()})


HELD = "held"  # in the client's own state: the global model it holds (``transport.down``)


def _receive(content: RecordDict, state: RecordDict) -> tuple[ArrayRecord, np.ndarray | None]:
    """The global model the message brings, as a plain record (a ``transport.down`` chain
    applied to the model this client holds; the message itself is left as it came), and the
    model to hold from now on (None where it came whole as fp32: nothing to hold)."""
    from fl_client.model import WEIGHTS_KEY
    from fl_client.transport import DOWN_KEY, receive

    record = content[wire.ARRAYS]
    if DOWN_KEY not in record:
        return record, None
    model, _ = receive(record, _own_state(state).get(HELD))
    return ArrayRecord({WEIGHTS_KEY: Array(model)}), model


def _keep_local_mask(config: RoundConfig, model) -> np.ndarray | None:
    """Mask of the values this client keeps local (``keep_local``, e.g. ``bn,head``)."""
    from fl_client.model import local_mask

    return local_mask(model, list(config.keep_local)) if config.keep_local else None


def _personalize(model, config: RoundConfig, state: RecordDict) -> np.ndarray | None:
    """Overwrite the parts this client keeps local with its own values from earlier rounds.

    FedBN-style (``keep-local=bn``) or partial aggregation (``keep-local=head``): the global
    model brings the shared parts; in round 1 there is nothing of its own yet, so the client
    starts from the global values everywhere.
    """
    from fl_client.model import WEIGHTS_KEY, load_record, to_record

    mask = _keep_local_mask(config, model)
    own = _own_state(state).get("local")
    if mask is None or own is None or own.size != int(mask.sum()):
        return mask
    flat = to_record(model)[WEIGHTS_KEY].numpy()
    flat[mask] = own
    load_record(model, ArrayRecord({WEIGHTS_KEY: Array(flat)}))
    return mask


def _act_out_before(
    injected: list[dict], server_round: int, data_yaml: Path, nc: int, pid: int
) -> Path:
    """Faults that act before training (crash, hang, label flipping); returns the train yaml."""
    from fl_client import faults

    for fault in injected:
        what = faults.describe(fault, server_round)
        LOGGER.warning("client %d: %s", pid, what)
        if fault["kind"] == "crash":
            raise faults.InjectedFault(what)
        if fault["kind"] == "hang":
            time.sleep(float(fault["hang_seconds"]))
        if fault["kind"] == "corrupt_labels":
            return faults.flipped_label_shard(data_yaml, _workdir() / f"flipped_{pid}", nc)
    return data_yaml


def _data_stats(data_yaml: Path, config: RoundConfig, pid: int, server_round: int) -> dict:
    """This round's statistics of the client's training data (``ds-*`` metrics), or {}.

    Cheap by design (a sample of ``drift-sample`` images); a failure here never costs the round.
    """
    sample = config.drift_sample
    if sample <= 0:
        return {}
    from fl_client.data_stats import shard_stats, to_metrics

    try:
        stats = shard_stats(
            data_yaml, sample=sample, seed=server_round * 7919 + pid, nc=len(config.names)
        )
        return to_metrics(stats)
    except Exception as e:  # noqa: BLE001 - statistics are optional, training is not
        LOGGER.warning("client %d: data statistics failed (%s: %s)", pid, type(e).__name__, e)
        return {}


def handle(kind: str, content: RecordDict, node: Mapping, state: RecordDict) -> RecordDict:
    """The reply content to a ``train`` or ``evaluate`` message's content; ``state`` (the
    client's Flower ``context.state``) is updated in place. The message's scratch folder is
    removed afterwards, whatever happened. Every reply carries this process's peak memory
    (``rss-mb``)."""
    try:
        reply = (train_content if kind == "train" else evaluate_content)(content, node, state)
    finally:
        _clear_workdir()
    reply[wire.METRICS][wire.RSS_MB] = peak_rss_mib()  # the process that did the work
    return reply


def train_content(content: RecordDict, node: Mapping, state: RecordDict) -> RecordDict:
    """Train the received global model on this client's shard for one round."""
    from fl_client import distill, faults
    from fl_client.model import WEIGHTS_KEY, to_record
    from fl_client.train import resolve_device, train_round
    from fl_client.transport import encode

    config = RoundConfig.from_record(content[wire.CONFIG])
    _setup_process(config)
    data_yaml = shard_yaml(node, config)
    pid = int(node.get(wire.PARTITION_ID, 0))
    server_round = config.server_round
    injected = faults.mine(config.faults, pid)
    ignored = 0
    if injected and not faults.opted_in(node):
        ignored, injected = len(injected), []
        LOGGER.warning(
            "client %d: ignored %d injected fault(s) of round %d: node config has no %s=true",
            pid,
            ignored,
            server_round,
            faults.OPT_IN,
        )
    train_yaml = _act_out_before(injected, server_round, data_yaml, len(config.names), pid)
    arrays_in, held = _receive(content, state)
    received = arrays_in[WEIGHTS_KEY].numpy()
    model = _model_for(config, arrays_in)
    mask = _personalize(model, config, state)
    seed = config.seed + 1000 * server_round + pid
    args = {k: v for k, v in asdict(config.train).items() if k != "eval_batch"}
    teacher = distill.teacher_for(config.teacher_sha256, content, list(config.names))
    own = _own_state(state)
    projector = _prefixed(own, PROJECTOR)
    kept_optimizer = _prefixed(own, OPTIMIZER)
    result = train_round(
        model,
        train_yaml,
        _workdir(),
        **{**args, "device": resolve_device(config.train.device)},
        lrf=config.round_lrf,
        seed=seed,
        prox_mu=config.proximal_mu,
        teacher=teacher,
        distill_weight=config.distill_weight,
        projector=projector or None,
        optimizer_state=kept_optimizer or None,
    )
    if kept_optimizer and not result.optimizer_restored:
        LOGGER.warning(
            "client %d: its optimiser state from an earlier round cannot be restored (another "
            "model or optimiser, or a NaN from a diverged round): round %d starts from zero "
            "momentum",
            pid,
            server_round,
        )
    trained = to_record(model)[WEIGHTS_KEY].numpy()
    for fault in injected:
        trained = faults.corrupt_weights(fault, trained, received, seed)
    had_state = bool(own)
    arrays, residual = encode(trained, received, config.transport, own.get("residual"))
    own = {"residual": residual} if residual is not None else {}
    if held is not None:
        own[HELD] = held
    if mask is not None:
        own["local"] = trained[mask]
    for k, v in (result.projector or {}).items():  # distillation projectors stay here
        own[PROJECTOR + k] = v
    for k, v in (result.optimizer_state or {}).items():  # so do optimiser states
        own[OPTIMIZER + k] = v
    _keep_own(state, own)
    losses = result.losses
    distilled = (
        {
            wire.LOSS_DISTILL: float(losses.get("dis_loss", float("nan"))),
            wire.TEACHER_RECEIVED: int(wire.TEACHER_KEY in content.array_records),
        }
        if teacher is not None
        else {}
    )
    return wire.TrainReply(
        arrays,
        num_examples=result.num_examples,
        partition_id=pid,
        metrics={
            wire.LOSS: float(sum(losses.values())) if losses else float("nan"),
            wire.LOSS_BOX: float(losses.get("box_loss", float("nan"))),
            wire.LOSS_CLS: float(losses.get("cls_loss", float("nan"))),
            wire.LOSS_DFL: float(losses.get("dfl_loss", float("nan"))),
            **distilled,
            wire.SETUP_SECONDS: result.timing.setup,
            wire.TRAIN_SECONDS: result.timing.epochs,
            wire.BATCH_SECONDS: result.timing.batches,
            wire.BATCHES: result.timing.batch_count,
            # 1 when this client still had its own arrays (local parts, transport residual)
            # from an earlier round: the engine kept its Flower context.state
            wire.KEPT_STATE: int(had_state),
            **(
                {wire.MOMENTUM_KEPT: int(result.optimizer_restored)}
                if config.train.keep_momentum
                else {}
            ),
            **({wire.FAULTS_IGNORED: ignored} if ignored else {}),
        },
        data_stats=_data_stats(data_yaml, config, pid, server_round),
    ).to_content()


def evaluate_content(content: RecordDict, node: Mapping, state: RecordDict) -> RecordDict:
    """Evaluate the received global model on this client's local validation split."""
    from fl_client.evaluate import evaluate_checkpoint
    from fl_client.model import save_checkpoint
    from fl_client.train import resolve_device
    from fl_client.ultralytics_adapter import val_images

    config = RoundConfig.from_record(content[wire.CONFIG])
    _setup_process(config)
    data_yaml = shard_yaml(node, config)
    arrays_in, held = _receive(content, state)
    if held is not None:
        _keep_own(state, {**_own_state(state), HELD: held})
    model = _model_for(config, arrays_in)
    _personalize(model, config, state)  # evaluate the model this client actually uses
    imgsz = config.train.imgsz
    ckpt = save_checkpoint(model, _workdir() / "global.pt", {"imgsz": imgsz}, {})
    res = evaluate_checkpoint(
        ckpt,
        data_yaml,
        imgsz=imgsz,
        batch=config.train.eval_batch,
        device=resolve_device(config.train.device),
        workdir=_workdir(),
    )
    num_val = len(list(val_images(data_yaml).glob("*")))
    return wire.EvalReply(
        num_examples=num_val,
        partition_id=int(node.get(wire.PARTITION_ID, 0)),
        metrics={
            wire.MAP50: res["map50"],
            wire.MAP50_95: res["map50_95"],
            wire.PRECISION: res["precision"],
            wire.RECALL: res["recall"],
        },
    ).to_content()
