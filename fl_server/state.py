"""The server's state after each finished round: what ``fedyolo run resume=runs/<name>`` needs.

``runs/<name>/server_state.npz`` holds the last finished round, the global model as the exact
float32 vector, the strategy's own state (a server optimizer's moments, FedAvgM's momentum, an
adaptive DP clipping norm...), the best round's weights and strategy state (what a rollback
restores), the drift guard's and the data-drift monitor's state and the tracker's task id. It is
replaced atomically after the round's line is in ``metrics.jsonl``, so a server killed at any
moment leaves either the previous round's state or this one's; on resume, lines of a round the
state does not cover are dropped and the round is run again (nothing counted twice).

**Data only.** The file is a NumPy ``.npz`` read with ``allow_pickle=False``: one JSON document
(``state.json``: the structure, with a format version) plus one entry per array. Nothing in it
can run code on load, and a truncated or foreign file is refused in one line. A strategy's state
is its instance attributes (``fl_server.flower_adapter.strategy_state``: what Flower's strategies
keep between rounds: ``m_t``, ``v_t``, ``current_arrays``...): numbers, strings, arrays, Flower
``ArrayRecord``s and containers of them are saved; a nested strategy (a DP wrapper's inner one)
is saved attribute by attribute; callables are configuration, rebuilt from the config on
resume; anything else the format cannot hold is left out and named in the state (``skipped``)
and in the ``resume`` event.

Flower has no server checkpointing of its own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from fl_client.errors import UserError
from fl_server import flower_adapter
from fl_server.flower_adapter import NestedState
from fl_server.run_dir import RunDir

LOGGER = logging.getLogger("fedyolo")

FORMAT = 2
KIND = "fedyolo-server-state"
FILENAME = RunDir.STATE  # its name in the run directory
_DOC = "state.json"  # the member of the .npz that holds the JSON part (not a run file)


class StateError(UserError, ValueError):
    """A state file that cannot be used: truncated, foreign, or of another format."""


def inner(strategy: Any) -> Any:
    """The configured strategy inside fedyolo's ``GuardedStrategy`` wrapper."""
    return getattr(strategy, "inner", strategy)


def strategy_state(strategy: Any) -> dict:
    """A deep copy of the strategy's state (its attributes between rounds)."""
    return copy.deepcopy(flower_adapter.strategy_state(inner(strategy)))


def live_strategy_state(strategy: Any) -> dict:
    """The strategy's state as it is, not copied (what :func:`save` encodes at once)."""
    return flower_adapter.strategy_state(inner(strategy))


def restore_strategy(strategy: Any, state: dict) -> None:
    flower_adapter.restore_strategy_state(inner(strategy), copy.deepcopy(state))


# -- encode: Python values -> JSON + arrays ------------------------------------------------------
class _Encoder:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.skipped: list[str] = []  # data the format cannot hold (named in the resume event)
        self._stored: dict[tuple, str] = {}  # content -> name: each distinct array stored once

    def array(self, a: np.ndarray) -> dict:
        """A reference to ``a`` in the file; equal arrays (the best round's weights when it is
        the current one, a strategy's copy of the global model) share one entry."""
        a = np.ascontiguousarray(a)
        key = (a.dtype.str, a.shape, hashlib.sha256(a.data).hexdigest())  # ~8 ms per 12.8 MB
        name = self._stored.get(key)
        if name is None:
            name = self._stored[key] = f"a{len(self.arrays)}"
            self.arrays[name] = a
        return {"__array__": name}

    def value(self, v: Any, where: str, depth: int = 0) -> Any:
        if v is None or isinstance(v, bool | int | str):
            return v
        if isinstance(v, float):
            return v if np.isfinite(v) else {"__float__": repr(v)}
        if isinstance(v, np.generic):
            return self.value(v.item(), where, depth)
        if isinstance(v, np.ndarray):
            if v.dtype == object:
                raise _Skip
            return self.array(v)
        if isinstance(v, ArrayRecord):
            return {"__arrayrecord__": {k: self.array(v[k].numpy()) for k in v}}
        if isinstance(v, list | tuple):
            items = [self.value(x, f"{where}[{i}]", depth) for i, x in enumerate(v)]
            return {"__tuple__": items} if isinstance(v, tuple) else items
        if isinstance(v, dict):
            if all(isinstance(k, str) for k in v) and not any(k.startswith("__") for k in v):
                return {k: self.value(x, f"{where}.{k}", depth) for k, x in v.items()}
            return {
                "__items__": [[self.value(k, where), self.value(x, where)] for k, x in v.items()]
            }
        if depth == 0 and isinstance(v, Strategy):  # a wrapper's inner strategy
            return {"__object__": self.attrs(flower_adapter.strategy_state(v), where, depth + 1)}
        raise _Skip

    def attrs(self, attrs: dict, where: str, depth: int = 0) -> dict:
        out = {}
        for key, v in attrs.items():
            if callable(v):
                continue  # configuration (an aggregation function...): rebuilt from the config
            try:
                out[key] = self.value(v, f"{where}.{key}", depth)
            except _Skip:
                self.skipped.append(f"{where}.{key}")
        return out


class _Skip(Exception):
    pass


def _decode(v: Any, arrays: Any) -> Any:
    if isinstance(v, list):
        return [_decode(x, arrays) for x in v]
    if not isinstance(v, dict):
        return v
    if "__array__" in v:
        return np.array(arrays[v["__array__"]])
    if "__arrayrecord__" in v:
        return ArrayRecord(
            {
                k: Array(np.array(arrays[ref["__array__"]]))
                for k, ref in v["__arrayrecord__"].items()
            }
        )
    if "__float__" in v:
        return float(v["__float__"])
    if "__tuple__" in v:
        return tuple(_decode(x, arrays) for x in v["__tuple__"])
    if "__items__" in v:
        return {_decode(k, arrays): _decode(x, arrays) for k, x in v["__items__"]}
    if "__object__" in v:
        return NestedState({k: _decode(x, arrays) for k, x in v["__object__"].items()})
    return {k: _decode(x, arrays) for k, x in v.items()}


# -- the file -------------------------------------------------------------------------------------
def save(path: Path, state: dict) -> list[str]:
    """Write ``state`` atomically (temporary file, fsync, rename); return skipped attributes.

    ``state["strategy"]`` and the strategy state in ``state["best"]`` are attribute
    dictionaries (``fl_server.flower_adapter.strategy_state``); everything else is numbers,
    strings, lists, dicts and arrays.
    """
    enc = _Encoder()
    doc = {k: v for k, v in state.items() if k not in ("strategy", "best", "weights")}
    doc = enc.value(doc, "state")
    best_w, best_strategy = state["best"]
    doc["weights_ref"] = enc.array(np.asarray(state["weights"]))
    doc["best_weights"] = enc.array(np.asarray(best_w))
    doc["strategy"] = (
        None if state["strategy"] is None else enc.attrs(state["strategy"], "strategy")
    )
    doc["best_strategy"] = None if best_strategy is None else enc.attrs(best_strategy, "strategy")
    doc["skipped"] = sorted(set(enc.skipped))
    doc.update(kind=KIND, format=FORMAT)
    buf = json.dumps(doc, allow_nan=False).encode()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **{_DOC: np.frombuffer(buf, np.uint8)}, **enc.arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return doc["skipped"]


def load(path: Path) -> dict:
    """The state saved by :func:`save`; StateError (one line) when the file is not one."""
    legacy = path.with_name("server_state.pkl")
    if not path.exists() and legacy.exists():
        raise StateError(
            f"{legacy}: a state written by an older fedyolo as a pickle, which can run code when "
            "loaded; it is not loaded. Start the run again"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the run never finished a round's state (nothing to resume)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        doc = json.loads(bytes(arrays.pop(_DOC)).decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise StateError(
            f"{path}: not a readable fedyolo server state ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:120]}); the run directory is left as it is"
        ) from e
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise StateError(f"{path}: not a fedyolo server state (no '{KIND}' marker)")
    if doc.get("format") != FORMAT:
        raise StateError(f"{path}: state format {doc.get('format')!r}, expected {FORMAT}")
    try:
        out = {k: _decode(v, arrays) for k, v in doc.items()}
        out["weights"] = out.pop("weights_ref")
        out["best"] = (out.pop("best_weights"), out.pop("best_strategy"))
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"{path}: inconsistent server state ({type(e).__name__}: {e})") from e
    return out


def check(path: Path) -> None:
    """Load and discard: raise StateError/FileNotFoundError before anything starts."""
    load(path)


__all__ = [
    "FILENAME",
    "FORMAT",
    "StateError",
    "check",
    "inner",
    "live_strategy_state",
    "load",
    "restore_strategy",
    "save",
    "strategy_state",
]
