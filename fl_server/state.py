"""The server's state after each finished round: what ``fedyolo run resume=runs/<name>`` needs.

``runs/<name>/server_state.pkl`` holds the last finished round, the global model as the exact
float32 vector, the strategy's own state (a server optimizer's moments, FedAvgM's momentum, an
adaptive DP clipping norm...), the best round's weights and strategy state (what a rollback
restores), the drift guard's and the data-drift monitor's state and the tracker's task id. It is
replaced atomically after the round's line is in ``metrics.jsonl``, so a server killed at any
moment leaves either the previous round's state or this one's; on resume, lines of a round the
state does not cover are dropped and the round is run again (nothing counted twice).

Flower has no server checkpointing of its own; a strategy's state is its instance attributes,
which is what Flower's strategies keep between rounds (``m_t``, ``v_t``, ``current_arrays``...).
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("fedyolo")

FORMAT = 1


def inner(strategy: Any) -> Any:
    """The configured strategy inside fedyolo's ``GuardedStrategy`` wrapper."""
    return getattr(strategy, "inner", strategy)


def strategy_state(strategy: Any) -> dict:
    """A deep copy of the strategy's attributes (its state between rounds)."""
    return copy.deepcopy(vars(inner(strategy)))


def restore_strategy(strategy: Any, state: dict) -> None:
    vars(inner(strategy)).update(copy.deepcopy(state))


def save(path: Path, state: dict) -> None:
    """Write ``state`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        pickle.dump({"format": FORMAT, **state}, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the run never finished a round's state (nothing to resume)"
        )
    with path.open("rb") as f:
        state = pickle.load(f)  # noqa: S301 - the server's own file in its own run directory
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: state format {state.get('format')!r}, expected {FORMAT}")
    return state
