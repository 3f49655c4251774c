"""Who caused a rolled-back round: a leave-one-out culprit search over the round's replies."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Attribution:
    """Who caused a rolled-back round, and the evidence (goes to the ``rollback`` event)."""

    culprits: list[str]
    # one step per culprit search: client id → the metric of the aggregate without it
    steps: list[dict[str, float]]

    def as_dict(self) -> dict:
        return {"method": "leave-one-out", "steps": self.steps}


def attribute(
    clients: Sequence[str],
    value: float,
    reference: float,
    score_without: Callable[[frozenset[str]], float],
    restored: Callable[[float], bool],
) -> Attribution:
    """Leave-one-out culprit search over a rolled-back round's replies.

    What a client did to the aggregate is measured, not its update alone: an honest client's
    solo model is often weak (early rounds, small shards, many clients), so "scores far below the
    others alone" cannot tell it from a poisoned one; the aggregate without an honest client is
    still poisoned, while the aggregate without the poisoned one is restored.

    ``score_without(S)`` is the held-out metric of the round's aggregate of every client not in
    ``S``; ``value`` that of the full aggregate, ``reference`` what the guard compared it with.
    Greedy: the client whose removal restores the most is a culprit when its removal alone wins
    back at least half of the drop, and by at least half of the drop more than removing a typical
    other client does (a noisy round where every removal helps a little names nobody). The search
    repeats on the rest until ``restored(metric)`` holds. It never names every client, and a
    tie for the top names nobody at that step.
    """
    remaining = sorted(clients)
    culprits: list[str] = []
    steps: list[dict[str, float]] = []
    current = value
    while len(remaining) >= 2:
        drop = reference - current
        if drop <= 0:
            break
        named = frozenset(culprits)
        without = {k: float(score_without(named | {k})) for k in remaining}
        steps.append(without)
        ranked = sorted(remaining, key=lambda k: without[k], reverse=True)
        top, others = ranked[0], [without[k] for k in ranked[1:]]
        gain = without[top] - current
        typical = max(0.0, statistics.median(others) - current)
        tied = len(ranked) > 1 and without[ranked[1]] == without[top]
        if tied or gain < 0.5 * drop or gain - typical < 0.5 * drop:
            break
        culprits.append(top)
        remaining.remove(top)
        current = without[top]
        if restored(current):
            break
    return Attribution(culprits, steps)
