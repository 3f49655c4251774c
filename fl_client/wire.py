"""The round contract between the server and its clients, in one place.

What a client receives each round besides the weights is one typed ``RoundConfig``, converted to
and from Flower's ``ConfigRecord`` here and nowhere else; the names of the metrics a client
reports are the constants below; a client's failure travels as a structured ``ClientFailure``
(the server reads the client's id from a field, never from an error message).

A new local-training parameter is one key in ``configs/train/default.yaml`` plus one field of
``TrainArgs`` (the server fills ``TrainArgs`` from ``cfg.train`` by field name).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fl_client.errors import UserError
from fl_client.transport import TransportSpec

# -- metric names a client's replies carry (MetricRecord keys) -----------------------------------
NUM_EXAMPLES = "num-examples"  # FedAvg's weight: the real count of the client's examples
PARTITION_ID = "partition-id"  # which client (its shard) sent the reply
DATA_STATS_PREFIX = "ds-"  # data statistics (fl_client.data_stats)
# every other metric key becomes a field of the round record: "train-seconds" → "train_seconds"
FAILURE_KEY = "fedyolo-failure"  # the ConfigRecord of a structured failure reply


class WireError(UserError, ValueError):
    """A round config or reply that does not follow this contract."""


def record_field(metric: str) -> str:
    """A reply's metric key as the field name in ``metrics.jsonl`` (``train-seconds`` →
    ``train_seconds``)."""
    return metric.replace("-", "_")


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
            {"partition-id": self.partition_id, "round": self.server_round, "reason": self.reason}
        )
        return Message(content=RecordDict({FAILURE_KEY: rec}), reply_to=msg)

    @classmethod
    def from_reply(cls, reply: Message) -> ClientFailure | None:
        """The failure a reply carries, or None for an ordinary reply (or a Flower error)."""
        if reply.has_error() or FAILURE_KEY not in reply.content.config_records:
            return None
        rec = reply.content.config_records[FAILURE_KEY]
        try:
            pid = int(rec["partition-id"])
            return cls(pid if pid >= 0 else None, int(rec["round"]), str(rec["reason"]))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            return cls(None, 0, f"malformed failure reply ({type(e).__name__}: {e})")

    def __str__(self) -> str:
        who = "client ?" if self.partition_id is None else f"client {self.partition_id}"
        return f"{who} (round {self.server_round}): {self.reason}"


# -- helpers ---------------------------------------------------------------------------------------
def _key(name: str) -> str:
    return name.replace("_", "-")


def _transport_key(name: str) -> str:
    return "transport" if name == "scheme" else f"transport-{_key(name)}"


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


_CASTS = {"int": int, "float": float, "str": str, "bool": bool, "list": list}


def _cast(typ: Any, value: Any) -> Any:
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    name = name.split("[")[0]
    if name == "bool" and not isinstance(value, bool):
        raise TypeError(f"expected a bool, got {type(value).__name__}")
    cast = _CASTS.get(name)
    return cast(value) if cast else value
