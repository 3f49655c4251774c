"""Fault injection: make chosen clients misbehave in chosen rounds (config group ``faults``).

For fedyolo's own tests and for users who want to see what their deployment does when a robot
misbehaves. The server sends the faults of the round in the round config (``faults``, JSON);
the client whose ``partition-id`` matches acts them out, so only the server's config changes,
in every engine::

    fedyolo run faults.client=1 faults.round=3 faults.kind=random_weights
    fedyolo run 'faults.more=[{client: 0, round: 2, kind: crash}, {client: 2, round: 4, kind: nan}]'

A client acts faults out only when its node config opts in (``fault-injection=true``; the
local engines and the tests set it when faults are configured): a server must not be able to
make a robot hang or train on flipped labels. Any other client trains honestly, logs that it
ignored them and says so in its reply (metric ``faults-ignored``, an event on the server).

Kinds:

* ``crash``: the client's train handler raises (Flower returns an error reply);
* ``hang``: the client stalls ``hang_seconds`` (default: the round timeout + 30 s) before
  training, so its reply misses the round;
* ``nan``: the returned weights contain NaN;
* ``scaled_weights``: the client's update (returned − received) is multiplied by ``scale``
  (a boosted, model-replacement style update);
* ``random_weights``: random weights with the norm of the received model;
* ``corrupt_labels``: the client trains on its shard with every box's class shifted by one
  (label flipping); its update looks normal in size.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fl_client.data.formats import label_path_for, read_data_yaml
from fl_client.data.labels import LabelLineError, read_lines
from fl_client.wire import FAULTS_IGNORED

OPT_IN = "fault-injection"  # the node config key that lets this node act faults out
IGNORED_METRIC = FAULTS_IGNORED  # a reply's count of faults the node did not act out

KINDS = ("crash", "hang", "nan", "scaled_weights", "random_weights", "corrupt_labels")


class InjectedFault(RuntimeError):
    """A failure the configuration asked for (``faults.kind=crash``)."""


@dataclass(frozen=True)
class Fault:
    client: int
    kind: str
    rounds: tuple[int, ...] | None = None  # None: every round
    scale: float | None = None  # scaled_weights only; its default is configs' faults.scale
    hang_seconds: float | None = None

    def active(self, server_round: int) -> bool:
        return self.rounds is None or server_round in self.rounds


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):  # YAML reads a bare `nan` as a float
        return "nan"
    return str(value).strip().lower()


def _ints(value: Any, key: str) -> tuple[int, ...]:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{key}={value!r}: expected an integer or a list of integers")
    return tuple(int(v) for v in values)


def _one(spec: Mapping, where: str, clients: int | None) -> list[Fault]:
    kind = _kind(spec.get("kind"))
    if kind not in KINDS:
        raise ValueError(f"{where}.kind={spec.get('kind')!r}: expected one of {list(KINDS)}")
    if spec.get("client") is None:
        raise ValueError(f"{where}.client is missing: which client (partition id) misbehaves?")
    ids = _ints(spec["client"], f"{where}.client")
    for c in ids:
        if c < 0 or (clients is not None and c >= clients):
            raise ValueError(
                f"{where}.client={c}: there are clients 0..{(clients or 1) - 1} in this run"
            )
    rounds = None if spec.get("round") is None else _ints(spec["round"], f"{where}.round")
    if rounds is not None and any(r < 1 for r in rounds):
        raise ValueError(f"{where}.round={list(rounds)}: rounds start at 1")
    scale = spec.get("scale")
    if kind == "scaled_weights" and not isinstance(scale, int | float):
        raise ValueError(f"{where}.scale={scale!r}: scaled_weights needs a number")
    scale = None if scale is None else float(scale)
    hang = spec.get("hang_seconds")
    if hang is not None and float(hang) <= 0:
        raise ValueError(f"{where}.hang_seconds={hang!r}: expected a number of seconds > 0")
    return [Fault(c, kind, rounds, scale, None if hang is None else float(hang)) for c in ids]


def parse(cfg: Mapping | None, clients: int | None = None) -> list[Fault]:
    """The faults of config group ``faults``; ValueError names the wrong key."""
    if not cfg:
        return []
    out: list[Fault] = []
    if _kind(cfg.get("kind")) is not None or cfg.get("client") is not None:
        out += _one(cfg, "faults", clients)
    for i, spec in enumerate(cfg.get("more") or []):
        if not isinstance(spec, Mapping):
            raise ValueError(f"faults.more[{i}]={spec!r}: expected {{client, round, kind}}")
        base = {"scale": cfg.get("scale"), "hang_seconds": cfg.get("hang_seconds")}
        out += _one({**base, **spec}, f"faults.more[{i}]", clients)
    return out


def for_round(faults: list[Fault], server_round: int, round_timeout: float) -> str:
    """The round config value: this round's faults as JSON ('' when there are none)."""
    active = []
    for f in faults:
        if f.active(server_round):
            d = asdict(f)
            d.pop("rounds")
            if d["hang_seconds"] is None:
                d["hang_seconds"] = float(round_timeout) + 30.0
            active.append(d)
    return json.dumps(active) if active else ""


def mine(round_faults: str, partition_id: int) -> list[dict]:
    """The faults this client must act out this round (``round_faults``: ``for_round``'s JSON)."""
    raw = str(round_faults or "")
    return [f for f in json.loads(raw) if int(f["client"]) == partition_id] if raw else []


def opted_in(node: Mapping) -> bool:
    """Whether this node's config lets it act out injected faults (``fault-injection=true``)."""
    return str(node.get(OPT_IN, "")).strip().lower() in ("true", "1")


def describe(fault: Mapping, server_round: int) -> str:
    return f"injected fault {fault['kind']} (client {fault['client']}, round {server_round})"


def corrupt_weights(
    fault: Mapping, trained: np.ndarray, received: np.ndarray, seed: int
) -> np.ndarray:
    """The weights a ``nan``/``scaled_weights``/``random_weights`` client returns."""
    kind = fault["kind"]
    if kind == "nan":
        out = trained.copy()
        out[:: max(1, out.size // 1000)] = np.nan
        return out
    if kind == "scaled_weights":
        return (received + float(fault["scale"]) * (trained - received)).astype(np.float32)
    if kind == "random_weights":
        rng = np.random.default_rng(seed)
        std = float(np.linalg.norm(received)) / math.sqrt(max(1, received.size))
        return (rng.standard_normal(received.size) * std).astype(np.float32)
    return trained


def flipped_label_shard(data_yaml: Path, out: Path, nc: int) -> Path:
    """A copy of the shard whose training labels have every class shifted by one.

    Images are symlinked (Ultralytics finds a label at the image path with ``images`` →
    ``labels``); the validation split stays the original. Returns the new ``data.yaml``.
    """
    spec = read_data_yaml(data_yaml)
    img_out = out / "images" / "train"
    img_out.mkdir(parents=True, exist_ok=True)
    lbl_out = out / "labels" / "train"
    lbl_out.mkdir(parents=True, exist_ok=True)
    for img in spec.images("train"):
        link = img_out / img.name
        if not link.exists():
            os.symlink(img.resolve(), link)
        lines = [
            line.format(cls=(int(line.cls) + 1) % nc)
            for line in read_lines(label_path_for(img))
            if not isinstance(line, LabelLineError)
        ]
        (lbl_out / f"{img.stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    new = {
        "path": str(out),
        "train": "images/train",
        "val": val[0] if len(val := [str(p) for p in spec.resolved("val")]) == 1 else val,
        "names": spec.names,
    }
    path = out / "data.yaml"
    path.write_text(yaml.safe_dump(new, sort_keys=False))
    return path
