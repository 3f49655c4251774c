"""Flower internals fedyolo relies on, on the server side.

The wire sizes and record bytes live in ``fl_client.flower_adapter`` (the warm worker needs them
and the client imports nothing of the server) and are re-exported here. Flower has no server
checkpointing: fedyolo's resumable state (``fl_server.state``) relies on a Flower strategy
keeping everything it carries between rounds (FedOpt's ``m_t``/``v_t``, FedAvgM's
``momentum_vector``, ``current_arrays``, a DP wrapper's clipping norm) in its instance attributes,
which is Flower's practice but no promise of its API. ``strategy_state`` and
``restore_strategy_state`` are that assumption, in one place;
``tests/fl_server/test_library_adapters.py`` fails when an upgrade breaks it.
"""

from __future__ import annotations

import copy
from typing import Any

from fl_client.flower_adapter import (
    recorddict_from_bytes,
    recorddict_to_bytes,
    varint_size,
    wire_bytes,
)


class NestedState:
    """The saved attributes of an object inside a strategy (a DP wrapper's inner strategy):
    restored into the live object, attribute by attribute, never replacing it."""

    def __init__(self, attrs: dict[str, Any]):
        self.attrs = attrs

    def __deepcopy__(self, memo: dict) -> NestedState:
        return NestedState(copy.deepcopy(self.attrs, memo))


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's state between rounds: its instance attributes, live (not a copy).

    PRIVATE: Flower's strategies keep their round-to-round state in instance attributes
    (``vars``); callables among them are configuration, not state.
    """
    return vars(strategy)


def restore_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    """Put ``state`` (from :func:`strategy_state`, possibly decoded) back into ``strategy``;
    a ``NestedState`` goes into the live object under that attribute."""
    for key, value in state.items():
        if isinstance(value, NestedState):
            current = getattr(strategy, key, None)
            if current is not None and hasattr(current, "__dict__"):
                restore_strategy_state(current, value.attrs)
            continue
        setattr(strategy, key, value)


__all__ = [
    "NestedState",
    "recorddict_from_bytes",
    "recorddict_to_bytes",
    "restore_strategy_state",
    "strategy_state",
    "varint_size",
    "wire_bytes",
]
