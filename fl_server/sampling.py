"""Which clients train in a round (``federation.sampling``), for fleets where a few of many are
sampled each round.

``uniform`` is Flower's own sampling, untouched: the strategy draws its sample uniformly from
the connected clients. The other policies keep the strategy's sample *size* (its
``fraction``/``min_train_nodes``) and the same message, and choose *which* clients:

* ``data``: in proportion to the examples a client reported when it last trained (a client
  not heard from yet counts as the median of those known, so new clients are tried);
* ``recency``: by how its recent tries went, weight ``0.5 ** misses``, where ``misses`` counts
  the times it was sampled since its last good reply (at most 10: 1/1024); a client whose last
  try succeeded, or that was not tried yet, weighs 1. A client that keeps failing or timing out
  sinks, so a fleet whose robots come and go wastes fewer slots on those that are away;
  ``round_timeout`` still bounds the wait for any one of them.

Neither starves anyone: a connected client that was not sampled for ``max_skip`` rounds is taken
before any weighted draw, the longest-waiting first (when more are overdue than the sample has
slots, the rest wait a round more: at most ``max_skip`` + clients / sample size rounds). The
draw is seeded by the run's seed and the round (as Flower's is), and the history is part of the
resumable state, so a resumed run samples as an uninterrupted one would.

Strategies that send each node its own content (a plug-in's) keep their own sample: the policy
applies where every message of the round carries the same content, as Flower's strategies do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

POLICIES = ("uniform", "data", "recency")
RECENCY_CAP = 10  # misses: below 0.5**10 a client's weight stops shrinking


class Sampler:
    def __init__(self, policy: str, max_skip: int, seed: int):
        if policy not in POLICIES:
            raise ValueError(f"federation.sampling={policy!r}: choose one of {list(POLICIES)}")
        self.policy, self.max_skip, self.seed = policy, max_skip, seed
        self.sampled: dict[str, int] = {}  # client → last round it was sampled
        self.misses: dict[str, int] = {}  # client → tries since its last good reply
        self.examples: dict[str, int] = {}  # client → examples it last reported
        # node → the key its history is under: "node-<id>" until the node's first reply binds
        # it to a client (fl_server.partition_binding), then the client's id
        self.keys: dict[int, str] = {}

    def choose(
        self, rnd: int, nodes: list[int], k: int, client_of: Callable[[int], object]
    ) -> list[int] | None:
        """``k`` of ``nodes`` for round ``rnd`` (None: ``uniform``, Flower's sample stands)."""
        if self.policy == "uniform":
            return None
        ids = {n: str(client_of(n)) for n in nodes}
        for n, key in ids.items():
            old = self.keys.get(n)
            if old is not None and old != key:  # bound since: its history moves to the client
                for d in (self.sampled, self.misses, self.examples):
                    if old in d:
                        d[key] = d.pop(old)
            self.keys[n] = key
        if k >= len(nodes):  # everyone: Flower's sample is the same
            for c in ids.values():
                self.sampled[c] = rnd
                self.misses[c] = self.misses.get(c, 0) + 1
            return None
        waited = {n: rnd - self.sampled.get(ids[n], 0) for n in nodes}
        overdue = sorted((n for n in nodes if waited[n] > self.max_skip), key=lambda n: -waited[n])
        chosen = overdue[:k]
        rest = [n for n in nodes if n not in chosen]
        if len(chosen) < k:
            w = np.array([self._weight(rnd, ids[n]) for n in rest], np.float64)
            rng = np.random.default_rng([self.seed, rnd])
            picked = rng.choice(len(rest), size=k - len(chosen), replace=False, p=w / w.sum())
            chosen += [rest[i] for i in sorted(picked)]
        for n in chosen:
            self.sampled[ids[n]] = rnd
            self.misses[ids[n]] = self.misses.get(ids[n], 0) + 1  # until it answers
        return chosen

    def _weight(self, rnd: int, client: str) -> float:
        if self.policy == "data":
            known = list(self.examples.values())
            return float(self.examples.get(client, np.median(known) if known else 1) or 1)
        return 0.5 ** min(self.misses.get(client, 0), RECENCY_CAP)

    def answered(self, node: int, examples: int) -> None:
        """``node`` answered this round with a good reply of ``examples`` examples."""
        key = self.keys.get(node, f"node-{node}")
        self.misses[key] = 0
        if examples > 0:
            self.examples[key] = int(examples)

    def state_dict(self) -> dict:
        keys = {str(n): k for n, k in self.keys.items()}
        return {
            "sampled": self.sampled,
            "misses": self.misses,
            "examples": self.examples,
            "keys": keys,
        }

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        for key in ("sampled", "misses", "examples"):
            setattr(self, key, {str(k): int(v) for k, v in (state.get(key) or {}).items()})
        self.keys = {int(n): str(k) for n, k in (state.get("keys") or {}).items()}


__all__ = ["POLICIES", "Sampler"]
