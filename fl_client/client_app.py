"""The Flower ClientApp: local training and evaluation on this client's own shard.

A client never sends images or labels: only the weights it trained and the numbers describing
how (``num-examples`` is the real count of training images in its shard).

Which shard: the SuperNode's node config ``data-path`` (a ``data.yaml``) when given, as on a
real robot; otherwise ``<data-root>/client_<partition-id>/data.yaml`` from the run's prepared
shards (simulation and the local deployment engine).

Where the work runs: in this process, or, with node config ``warm-worker=true`` (the deployment
engines set it), in the SuperNode's long-lived warm worker (``fl_client.worker``), which keeps
torch, Ultralytics, the model and the data pipeline loaded across messages. Either way the same
functions (``fl_client.handlers``: ``handle``, ``train_content``, ``evaluate_content``) do the
work; this module is Flower's glue only (the app, its mods, the train and evaluate entry points)
and imports only Flower and numpy, so the per-message ``flwr-clientapp`` process that hands a
message over starts in well under a second.
"""

from __future__ import annotations

import logging
import os
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fl_client import wire, worker
from fl_client.handlers import (  # noqa: F401 - the work's names, importable from here as before
    _MODEL_CACHE,
    PROJECTOR,
    STATE_KEY,
    _keep_own,
    _personalize,
    evaluate_content,
    handle,
    shard_yaml,
    train_content,
)
from fl_client.wire import ClientFailure, RoundConfig

LOGGER = logging.getLogger(__name__)


def _client_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side DP clipping mods, for runs whose strategy asks for them.

    ``strategy.dp=client-fixed`` / ``client-adaptive`` set ``dp-clipping`` in the round config
    (and Flower's server wrapper the clipping norm); every other run passes through untouched.
    """
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    if msg.metadata.message_type == "train" and wire.CONFIG in msg.content.config_records:
        kind = RoundConfig.from_record(msg.content[wire.CONFIG]).dp_clipping
        if kind == "fixed":
            return fixedclipping_mod(msg, context, call_next)
        if kind == "adaptive":
            return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _client_error_mod(msg: Message, context: Context, call_next) -> Message:
    """Any failure in a handler becomes a structured failure reply (``fl_client.wire``): the
    server's events name the client from a field, not only the node id."""
    try:
        return call_next(msg, context)
    except Exception as e:
        pid = int(context.node_config.get(wire.PARTITION_ID, -1))
        config = msg.content.config_records.get(wire.CONFIG, {})
        rnd = int(config.get(wire.SERVER_ROUND, 0)) if config else 0
        # the warm worker's failures arrive already named ("ValueError: ...")
        why = str(e) if getattr(e, "named", False) else f"{type(e).__name__}: {e}"
        LOGGER.warning("client %d (round %d) failed: %s", pid, rnd, why)
        return ClientFailure(pid, rnd, why).to_reply(msg)


def _fault_opt_in_mod(msg: Message, context: Context, call_next) -> Message:
    """The simulation engine's nodes opt in to fault injection (its SuperNodes take no node
    config): a run whose config injects faults gets ``app_with_fault_injection()``."""
    from fl_client.faults import OPT_IN

    context.node_config[OPT_IN] = True
    return call_next(msg, context)


app = ClientApp(mods=[_client_error_mod, _client_dp_mod])

_FIRST_MESSAGE = True


def _startup_seconds(t_handler: float) -> float:
    """Seconds from this process's creation to the handler, on its first message (else 0).

    In the deployment engine every message starts a new ``flwr-clientapp`` process, so this is
    the per-round start-up cost (interpreter, imports, Flower pulling the message).
    """
    global _FIRST_MESSAGE
    if not _FIRST_MESSAGE:
        return 0.0
    _FIRST_MESSAGE = False
    import psutil

    return max(0.0, t_handler - psutil.Process().create_time())


def _run(kind: str, msg: Message, context: Context) -> Message:
    """One message's work, here or in the node's warm worker; timing added to its metrics."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing is downloaded at run time
    t0 = time.perf_counter()
    startup = _startup_seconds(time.time())
    node = context.node_config
    if str(node.get("warm-worker", "")).lower() in ("true", "1"):
        content = worker.call(kind, msg.content, context)
    else:
        content = handle(kind, msg.content, node, context.state)
    metrics = content[wire.METRICS]
    metrics[wire.HANDLER_SECONDS] = time.perf_counter() - t0
    metrics[wire.STARTUP_SECONDS] = startup
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's shard for one round."""
    return _run("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's local validation split."""
    return _run("evaluate", msg, context)


def app_with_fault_injection() -> ClientApp:
    """This ClientApp, with every node opted in to fault injection (``fl_client.faults``)."""
    opted = ClientApp(mods=[_fault_opt_in_mod, _client_error_mod, _client_dp_mod])
    opted.train()(train)
    opted.evaluate()(evaluate)
    return opted
