"""The clients' learning rate across the federation's rounds (``train.lr_schedule``).

A federation of R rounds of E local epochs trains R x E epochs in all; ``linear`` and ``cos``
decay the learning rate over those epochs from ``lr0`` to ``lr0 x lrf``, as Ultralytics does
over a centralized run's epochs (its ``lrf`` and ``cos_lr``), so a federated run and a
centralized one of the same epochs follow the same curve. Decaying the step size is what lets
FedAvg settle on non-IID clients: with a constant one, the clients' models keep drifting apart by
an amount proportional to it (Li et al., "On the convergence of FedAvg on non-IID data", 2020).

Each round, the server sends the round's starting learning rate (``lr0``) and the fraction of it
reached after the round's local epochs (``lrf``); the client's Ultralytics trainer interpolates
linearly between the two, epoch by epoch. For ``linear`` that is the global schedule exactly;
for ``cos`` it is the cosine's chord over each round (the same values at every round's start).
The schedule depends on the round number and ``federation.rounds`` only, so a resumed run follows
it exactly (a run resumed with more rounds stretches the rest of it).
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cos")


def factor(schedule: str, epoch: float, total: float, lrf: float) -> float:
    """The learning rate after ``epoch`` of ``total`` epochs, as a fraction of ``lr0``."""
    x = min(max(epoch / total, 0.0), 1.0) if total > 0 else 1.0
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - x * (1.0 - lrf)
    if schedule == "cos":
        return 1.0 - (1.0 - math.cos(math.pi * x)) / 2.0 * (1.0 - lrf)
    raise ValueError(f"train.lr_schedule={schedule!r}: choose one of {list(SCHEDULES)}")


def round_rates(
    schedule: str, rnd: int, rounds: int, epochs: int, lrf: float
) -> tuple[float, float]:
    """Round ``rnd``'s (1-based) starting learning rate as a fraction of ``lr0``, and the fraction
    of that starting rate its local epochs end at (Ultralytics' ``lrf`` for the round)."""
    total = rounds * epochs
    start = factor(schedule, (rnd - 1) * epochs, total, lrf)
    end = factor(schedule, rnd * epochs, total, lrf)
    return start, (end / start if start > 0 else 1.0)
