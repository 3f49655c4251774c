"""The round contract between the server and its clients, in one place.

What a client receives each round besides the weights is one typed ``RoundConfig``, converted to
and from Flower's ``ConfigRecord`` here and nowhere else. What it sends back is a typed
``TrainReply`` or ``EvalReply``: the client builds the reply's content with ``to_content()``, the
server reads it with ``parse(msg)``, which raises ``WireError`` naming the first key that is
missing or malformed (the server turns that into a recorded rejection, never an exception in its
round). A client's failure travels as a structured ``ClientFailure`` (the server reads the
client's id from a field, never from an error message). Every key of a message's content, of
the round config and of a reply's metrics is a constant below; ``fl_client.transport`` (the
weights' encodings), ``fl_client.distill`` (the teacher), ``fl_client.data_stats`` and the
server import them from here.

A new local-training parameter is one key in ``configs/train/default.yaml`` plus one field of
``TrainArgs`` (the server fills ``TrainArgs`` from ``cfg.train`` by field name); the keys of
``SCHEDULE_KEYS`` are the server's, which sends their effect as each round's ``lr0`` and
``round-lrf``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_client.errors import UserError

# -- the records of a message's content (Flower's strategies' default names) --------------------
ARRAYS = "arrays"  # the model's ArrayRecord, both ways
CONFIG = "config"  # the round config's ConfigRecord (server → client)
METRICS = "metrics"  # a reply's MetricRecord
TEACHER_KEY = "teacher"  # distillation: the teacher's ArrayRecord (a node's first train message)
TEACHER_ARCH_KEY = "teacher-arch"  # ... and its ConfigRecord: {"arch": json, "sha256": hex}
FAILURE_KEY = "fedyolo-failure"  # the ConfigRecord of a structured failure reply
SERVER_ROUND = "server-round"  # the round config's round (Flower's strategies set it)

# -- the arrays of a model's record (fl_client.transport encodes and decodes them) ----------------
WEIGHTS_KEY = "weights"  # the one array of a model's record: every exchanged value, packed
SCHEME_KEY = "transport"  # int8 array naming a delta scheme, so the server needs no side channel
SCHEMES = ("fp32", "fp16", "q8", "q4", "topk", "q4z")  # their codes: the index here
DOWN_SCHEMES = ("fp32", "q4z")  # the global model's way down (``transport.down``)

# -- metric names a client's replies carry (MetricRecord keys) -----------------------------------
NUM_EXAMPLES = "num-examples"  # FedAvg's weight: the real count of the client's examples
PARTITION_ID = "partition-id"  # which client (its shard) sent the reply: its node config's
BATCHES = "batches"  # the optimizer's local steps: the per-step norm rule divides by it
FAULTS_IGNORED = "faults-ignored"  # injected faults the node did not act out (no opt-in)
KEPT_STATE = "kept-state"  # 1: the client still had its Flower context.state of earlier rounds
MOMENTUM_KEPT = "momentum-kept"  # train.keep_momentum: 1 when its optimiser resumed its state
LOSS, LOSS_BOX, LOSS_CLS, LOSS_DFL = "loss", "loss-box", "loss-cls", "loss-dfl"
LOSS_DISTILL = "loss-distill"  # distillation runs only
TEACHER_RECEIVED = "teacher-received"  # distillation runs only: 1 when this message carried it
SETUP_SECONDS, TRAIN_SECONDS, BATCH_SECONDS = "setup-seconds", "train-seconds", "batch-seconds"
HANDLER_SECONDS = "handler-seconds"  # the whole handler, as the ClientApp measured it
STARTUP_SECONDS = "startup-seconds"  # the ClientApp process's start-up (first message only)
RSS_MB = "rss-mb"  # peak resident memory (MiB) of the process that did the work (VmHWM)
MAP50, MAP50_95, PRECISION, RECALL = "map50", "map50-95", "precision", "recall"  # evaluate
DATA_STATS_PREFIX = "ds-"  # data statistics (fl_client.data_stats)
# every other metric key becomes a field of the round record: "train-seconds" → "train_seconds";
# fields of a client's record in metrics.jsonl that the server measures, never the client
SERVER_FIELDS = frozenset({"id", "node_id", "bytes_down", "bytes_up", "update_norm"})
MAX_EXAMPLES_CLAIM = 2**31 - 1
# keys of configs/train that the server turns into each round's lr0 and round_lrf (never sent)
SCHEDULE_KEYS = frozenset({"lr_schedule", "lrf"})

Metric = int | float | list[int] | list[float]  # what a MetricRecord holds


class WireError(UserError, ValueError):
    """A round config or reply that does not follow this contract."""


def record_field(metric: str) -> str:
    """A reply's metric key as the field name in ``metrics.jsonl`` (``train-seconds`` →
    ``train_seconds``)."""
    return metric.replace("-", "_")


@dataclass(frozen=True)
class TransportSpec:
    """A transport scheme and its parameters (``fl_client.transport``; their defaults:
    ``configs/transport/*.yaml``), sent in the round config as ``transport*`` keys."""

    scheme: str
    block: int  # q8/q4: values per quantization block (one float32 scale each)
    fraction: float  # topk: share of values sent
    error_feedback: bool

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"transport.scheme={self.scheme!r}: choose one of {list(SCHEMES)}")
        if self.block < 2 or self.block % 2:
            raise ValueError(f"transport.block={self.block}: an even integer >= 2")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"transport.fraction={self.fraction}: a number in (0, 1]")

    @property
    def is_delta(self) -> bool:
        return self.scheme != "fp32"


@dataclass(frozen=True)
class TrainArgs:
    """Ultralytics train arguments of a client's round: the keys of ``configs/train``."""

    epochs: int
    imgsz: int
    batch: int
    lr0: float
    optimizer: str
    momentum: float
    weight_decay: float
    mosaic: float
    device: str
    amp: bool
    workers: int
    eval_batch: int
    keep_momentum: bool

    @classmethod
    def from_cfg(cls, train_cfg: Any) -> TrainArgs:
        return cls(**{f.name: _cast(f.type, train_cfg[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class RoundConfig:
    """Everything a client is sent with the weights, each round."""

    train: TrainArgs
    transport: TransportSpec
    model_arch: str  # the model's architecture (its yaml as JSON): never a path to load
    names: tuple[str, ...]
    data_root: str  # the run's prepared shards (a SuperNode's node config may name its own)
    seed: int
    threads: int  # torch threads per client process; 0 = the machine's default
    drift_sample: int  # images sampled for data statistics; 0 = none
    keep_local: tuple[str, ...]  # model parts this client keeps (bn, backbone, neck, head)
    dp_clipping: str  # '' | fixed | adaptive: Flower's client-side DP clipping mod
    faults: str = ""  # this round's injected faults, JSON (fl_client.faults)
    server_round: int = 0  # set by Flower's strategies
    proximal_mu: float = 0.0  # set by Flower's FedProx
    teacher_sha256: str = ""  # distillation: the teacher's identity ('' = none; fl_client.distill)
    distill_weight: float = 0.0  # distillation: Ultralytics' ``dis``
    round_lrf: float = 1.0  # the learning rate after this round's epochs / lr0 (train.lr_schedule)

    def with_round(self, **changes: Any) -> RoundConfig:
        """A copy with top-level or ``train`` fields changed (e.g. ``lr0`` after a rollback)."""
        train = {k: changes.pop(k) for k in list(changes) if k in _names(TrainArgs)}
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **train), **changes)

    def to_record(self) -> ConfigRecord:
        rec: dict[str, Any] = {}
        for f in fields(TrainArgs):
            rec[_key(f.name)] = getattr(self.train, f.name)
        for f in fields(TransportSpec):
            rec[_transport_key(f.name)] = getattr(self.transport, f.name)
        for f in fields(self):
            if f.name in ("train", "transport"):
                continue
            value = getattr(self, f.name)
            if f.name == "names":
                value = list(value)
            elif f.name == "keep_local":
                value = ",".join(value)
            rec[_key(f.name)] = value
        return ConfigRecord(rec)

    @classmethod
    def from_record(cls, rec: Any) -> RoundConfig:
        """Parse a received config; a missing or mistyped key is a ``WireError`` naming it."""

        def get(key: str, typ: Any, default: Any = dataclasses.MISSING) -> Any:
            if key not in rec:
                if default is dataclasses.MISSING:
                    raise WireError(f"round config has no '{key}' (server and client differ?)")
                return default
            try:
                return _cast(typ, rec[key])
            except (TypeError, ValueError) as e:
                raise WireError(f"round config '{key}'={rec[key]!r}: {e}") from e

        train = TrainArgs(**{f.name: get(_key(f.name), f.type) for f in fields(TrainArgs)})
        transport = TransportSpec(
            **{f.name: get(_transport_key(f.name), f.type) for f in fields(TransportSpec)}
        )
        top: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("train", "transport"):
                continue
            if f.name == "names":
                top[f.name] = tuple(str(n) for n in get("names", list))
            elif f.name == "keep_local":
                top[f.name] = tuple(p for p in str(get("keep-local", str)).split(",") if p)
            else:
                top[f.name] = get(_key(f.name), f.type, f.default)
        return cls(train=train, transport=transport, **top)


@dataclass(frozen=True)
class ClientFailure:
    """A client's handler failed: who, in which round, and why (sent as a normal reply).

    ``partition_id`` is None when the client has none (a SuperNode with only ``data-path``) or
    sent a failure record that does not parse: a malformed reply is still a failure, never an
    exception in the server's round.
    """

    partition_id: int | None
    server_round: int
    reason: str

    def to_reply(self, msg: Message) -> Message:
        rec = ConfigRecord(
            {PARTITION_ID: self.partition_id, "round": self.server_round, "reason": self.reason}
        )
        return Message(content=RecordDict({FAILURE_KEY: rec}), reply_to=msg)

    @classmethod
    def from_reply(cls, reply: Message) -> ClientFailure | None:
        """The failure a reply carries, or None for an ordinary reply (or a Flower error)."""
        if reply.has_error() or FAILURE_KEY not in reply.content.config_records:
            return None
        rec = reply.content.config_records[FAILURE_KEY]
        try:
            pid = int(rec[PARTITION_ID])
            return cls(pid if pid >= 0 else None, int(rec["round"]), str(rec["reason"]))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            return cls(None, 0, f"malformed failure reply ({type(e).__name__}: {e})")

    def __str__(self) -> str:
        who = "client ?" if self.partition_id is None else f"client {self.partition_id}"
        return f"{who} (round {self.server_round}): {self.reason}"


@dataclass(frozen=True)
class TrainReply:
    """A ``train`` reply: the trained weights (one ``ArrayRecord``, in ``fl_client.transport``'s
    encoding) and the metrics.

    The server decides on the typed fields (FedAvg's weight, which partition answers, the
    data statistics); ``metrics`` are the others, in the order sent (losses, timings,
    ``batches``, ...), recorded in the client's entry of ``metrics.jsonl`` as they are. A
    plug-in ClientApp's reply needs only ``num-examples``.
    """

    arrays: ArrayRecord
    num_examples: int
    partition_id: int | None = None
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    data_stats: Mapping[str, Metric] = field(default_factory=dict)  # ds-* (fl_client.data_stats)

    def to_content(self) -> RecordDict:
        return RecordDict({ARRAYS: self.arrays, METRICS: _metric_record(self)})

    @classmethod
    def parse(cls, msg: Message) -> TrainReply:
        """The reply ``msg`` carries; ``WireError`` naming the first key that is wrong."""
        metrics = _metrics_of(msg)
        if NUM_EXAMPLES not in metrics:
            raise WireError(f"a train reply without '{NUM_EXAMPLES}'")
        num, pid, rest, stats = _split(metrics, least_examples=1)
        records = msg.content.array_records
        if len(records) != 1:
            raise WireError(f"expected one ArrayRecord in the reply, got {len(records)}")
        arrays = next(iter(records.values()))
        return cls(arrays, int(num), pid, rest, stats)  # type: ignore[arg-type]

    @property
    def batches(self) -> float | None:
        """The client's local steps (``batches``) when it is a usable positive count."""
        return local_steps(self.metrics.get(BATCHES))

    @property
    def faults_ignored(self) -> Metric:
        """Injected faults the node did not act out (0: none, or it acted them out)."""
        return self.metrics.get(FAULTS_IGNORED, 0)


@dataclass(frozen=True)
class EvalReply:
    """An ``evaluate`` reply: the client's metrics on its own validation split, no weights."""

    num_examples: int | None = None  # its validation images (a plug-in may name none)
    partition_id: int | None = None
    metrics: Mapping[str, Metric] = field(default_factory=dict)  # map50, ... in the order sent

    def to_content(self) -> RecordDict:
        return RecordDict({METRICS: _metric_record(self)})

    @classmethod
    def parse(cls, msg: Message) -> EvalReply:
        """The reply ``msg`` carries; ``WireError`` naming the first key that is wrong."""
        num, pid, rest, _ = _split(_metrics_of(msg), least_examples=0)
        return cls(num, pid, rest)


def local_steps(value: Any) -> float | None:
    """A reported ``batches`` as a usable positive count, else None (the per-step norm rule
    takes such a reply as one step: leaving it out must not help it)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) and value >= 1 else None


def whole(value: Any, key: str, least: int) -> int:
    """``value`` as an integer in ``least..MAX_EXAMPLES_CLAIM``; ``WireError`` naming ``key``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value != int(value):
        raise WireError(f"metric '{key}'={value!r}: expected a whole number")
    if not least <= int(value) <= MAX_EXAMPLES_CLAIM:
        raise WireError(f"metric '{key}'={int(value)}: expected {least}..{MAX_EXAMPLES_CLAIM}")
    return int(value)


def _amount(value: Any, key: str) -> float:
    """``value`` as a finite number >= 0 (a size, a duration); ``WireError`` naming ``key``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise WireError(f"metric '{key}'={value!r}: expected a finite number >= 0")
    return float(value)


# -- helpers ---------------------------------------------------------------------------------------
def _key(name: str) -> str:
    return name.replace("_", "-")


def _transport_key(name: str) -> str:
    return "transport" if name == "scheme" else f"transport-{_key(name)}"


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _metric_record(reply: TrainReply | EvalReply) -> MetricRecord:
    """The reply's metrics in the order the server records them (``parse``'s inverse)."""
    out: dict[str, Metric] = {}
    if reply.num_examples is not None:
        out[NUM_EXAMPLES] = reply.num_examples
    if reply.partition_id is not None:
        out[PARTITION_ID] = reply.partition_id
    out.update(reply.metrics)
    out.update(getattr(reply, "data_stats", {}))
    return MetricRecord(out)


def _metrics_of(msg: Message) -> dict[str, Any]:
    """A reply's metrics: its (first) MetricRecord, whatever the strategy named it."""
    records = msg.content.metric_records
    return dict(next(iter(records.values()))) if records else {}


def _split(
    metrics: dict[str, Any], least_examples: int
) -> tuple[int | None, int | None, dict[str, Metric], dict[str, Metric]]:
    """(num-examples, partition-id, the other metrics, the data statistics), checked."""
    num = metrics.get(NUM_EXAMPLES)
    num = None if num is None else whole(num, NUM_EXAMPLES, least_examples)
    pid = metrics.get(PARTITION_ID)
    pid = None if pid is None else whole(pid, PARTITION_ID, 0)
    for key in metrics:
        if record_field(key) in SERVER_FIELDS:
            raise WireError(f"metric '{key}' names a field the server measures")
    if RSS_MB in metrics:
        _amount(metrics[RSS_MB], RSS_MB)
    rest = {k: v for k, v in metrics.items() if k not in (NUM_EXAMPLES, PARTITION_ID)}
    stats = {k: v for k, v in rest.items() if k.startswith(DATA_STATS_PREFIX)}
    rest = {k: v for k, v in rest.items() if not k.startswith(DATA_STATS_PREFIX)}
    return num, pid, rest, stats


_CASTS = {"int": int, "float": float, "str": str, "bool": bool, "list": list}


def _cast(typ: Any, value: Any) -> Any:
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    name = name.split("[")[0]
    if name == "bool" and not isinstance(value, bool):
        raise TypeError(f"expected a bool, got {type(value).__name__}")
    cast = _CASTS.get(name)
    return cast(value) if cast else value
