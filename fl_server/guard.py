"""The mAP drift guard: after every round, keep the new global model or roll it back.

The global model's monitored metric (``guard.metric``, on the server's held-out set) is compared
with a reference: the best accepted round so far (``guard.reference=best``) or the last accepted
one (``previous``). A relative drop above ``guard.max_drop`` (default 10 %) that is also at least
``guard.min_abs_drop`` in absolute terms rolls the global model back to the best checkpoint,
server-side strategy state included (``fl_server.server_app``). Then the policy:

* ``rollback``: only roll back;
* ``lower_lr``: roll back and multiply the clients' ``lr0`` by ``guard.lr_factor`` from now on;
* ``exclude``: roll back and leave out, for ``guard.exclude_rounds`` rounds, the clients whose
  updates caused the drop: each reply of the bad round is scored on the held-out set on its own,
  and a client is a culprit when its model scores far below the others (``culprits``);

and, whatever the policy, the run stops after ``guard.stop_after`` consecutive rollbacks.
A rejected model is never promoted to ``best.pt``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Decision:
    """What the guard decided about one round's global model (goes to metrics and events)."""

    metric: str
    value: float
    reference: float | None
    reference_round: int | None
    drop: float  # relative drop below the reference (negative: an improvement)
    abs_drop: float
    rolled_back: bool

    def as_dict(self) -> dict:
        return {"decision": "rollback" if self.rolled_back else "accept", **asdict(self)}


@dataclass
class GuardState:
    best_round: int | None = None
    best_value: float | None = None
    previous_round: int | None = None
    previous_value: float | None = None
    consecutive: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    excluded: dict[str, int] = field(default_factory=dict)  # client id → last excluded round


class Guard:
    def __init__(self, cfg: Any):
        self.enabled = bool(cfg.enabled)
        self.metric = str(cfg.metric)
        self.reference = str(cfg.reference)
        self.max_drop = float(cfg.max_drop)
        self.min_abs_drop = float(cfg.min_abs_drop)
        self.policy = str(cfg.policy)
        self.lr_factor = float(cfg.lr_factor)
        self.exclude_rounds = int(cfg.exclude_rounds)
        self.stop_after = None if cfg.stop_after is None else int(cfg.stop_after)
        self.state = GuardState()

    def check(self, server_round: int, metrics: dict) -> Decision:
        """Compare this round's metric with the reference; does not change any state."""
        s = self.state
        value = float(metrics[self.metric])
        if self.reference == "best":
            ref, ref_round = s.best_value, s.best_round
        else:
            ref, ref_round = s.previous_value, s.previous_round
        abs_drop = 0.0 if ref is None else ref - value
        drop = abs_drop / ref if ref else 0.0
        trigger = (
            self.enabled
            and ref is not None
            and ref > 0
            and drop > self.max_drop
            and abs_drop >= self.min_abs_drop
        )
        return Decision(self.metric, value, ref, ref_round, drop, abs_drop, bool(trigger))

    def accept(self, server_round: int, metrics: dict) -> bool:
        """Record an accepted round; True when it is the new best."""
        s = self.state
        value = float(metrics[self.metric])
        s.previous_round, s.previous_value = server_round, value
        s.consecutive = 0
        if s.best_value is None or value > s.best_value:
            s.best_round, s.best_value = server_round, value
            return True
        return False

    def rolled_back(self, server_round: int, culprits: list[str]) -> dict:
        """Apply the policy after a rollback in ``server_round``; returns what changed."""
        s = self.state
        s.consecutive += 1
        s.rollbacks += 1
        changes: dict[str, Any] = {"policy": self.policy, "consecutive": s.consecutive}
        if self.policy == "lower_lr":
            s.lr_scale *= self.lr_factor
            changes["lr_scale"] = s.lr_scale
        if self.policy == "exclude":
            until = server_round + self.exclude_rounds
            for c in culprits:
                s.excluded[str(c)] = until
            changes["excluded_until_round"] = until if culprits else None
        return changes

    def should_stop(self) -> bool:
        return self.stop_after is not None and self.state.consecutive >= self.stop_after

    def excluded(self, server_round: int) -> set[str]:
        """Clients left out of ``server_round`` (policy ``exclude``)."""
        return {c for c, until in self.state.excluded.items() if server_round <= until}

    def culprits(self, scores: dict[str, float], reference: float | None) -> list[str]:
        """Clients whose update, scored alone on the held-out set, is far below the others.

        The yardstick is the round's median score with 3 or more replies, the better score with
        2, and the reference metric with 1; a culprit falls below it by more than ``max_drop``
        (relative) and ``min_abs_drop`` (absolute), the guard's own rule.
        """
        if not scores:
            return []
        values = list(scores.values())
        if len(values) >= 3:
            base = statistics.median(values)
        else:
            base = max(values) if len(values) == 2 else reference
        if base is None or base <= 0:
            return []
        return sorted(
            c
            for c, v in scores.items()
            if (base - v) / base > self.max_drop and base - v >= self.min_abs_drop
        )

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, d: dict) -> None:
        self.state = GuardState(**d)
