"""The mAP drift guard: after every round, keep the new global model or roll it back.

The global model's monitored metric (``guard.metric``, on the server's held-out set) is compared
with a reference: the best accepted round so far (``guard.reference=best``) or the last accepted
one (``previous``). A relative drop above ``guard.max_drop`` (default 10 %) that is also at least
``guard.min_abs_drop`` in absolute terms, and *significant* on the held-out images, rolls the
global model back to the best checkpoint, server-side strategy state included
(``fl_server.server_app``). Significant: a paired bootstrap over the held-out images
(``paired_drop``: both models' per-image matches are computed once by the evaluation; each of
``guard.bootstrap`` resamples recomputes both mAPs on the same resampled images) puts the
one-sided ``guard.significance`` lower bound of the drop above 0, so a dip within the held-out
set's own noise is not a rollback. It is computed only when the rule above fires. Then the policy:

* ``rollback``: only roll back;
* ``lower_lr``: roll back and multiply the clients' ``lr0`` by ``guard.lr_factor`` from now on;
* ``exclude``: roll back and leave out, for ``guard.exclude_rounds`` rounds, the clients whose
  updates caused the drop, found by leave-one-out (``attribute``): the round's aggregate without
  client k is scored on the held-out set, and k is a culprit when removing it restores the drop;

and, whatever the policy, the run stops after ``guard.stop_after`` consecutive rollbacks.
A rejected model is never promoted to ``best.pt``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


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
    # paired bootstrap of the absolute drop when the rule fired: {low, high, resamples, seconds};
    # None when not computed (no rule fired, significance off, or no per-image data)
    drop_ci: dict | None = None
    significant: bool | None = None

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
    suspicious: dict[str, int] = field(default_factory=dict)  # client id → last suspicious round
    participated: dict[str, int] = field(default_factory=dict)  # client id → last scored round
    flags: int = 0


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
        sig = cfg.get("significance")
        self.significance = None if sig is None else float(sig)
        self.bootstrap = int(cfg.get("bootstrap") or 200)
        self.contribution = bool(cfg.get("contribution") or False)
        self.state = GuardState()
        # the reference rounds' per-image matches (not saved: re-evaluated on resume)
        self.images: dict[str, dict | None] = {"best": None, "previous": None}

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
        trigger = bool(self.enabled and ref is not None and self.is_drop(value, ref))
        ci, significant = None, None
        ref_images, images = self.images[self.reference], metrics.get("images")
        if trigger and self.significance is not None and ref_images and images:
            ci = paired_drop(
                ref_images, images, self.metric, self.bootstrap, self.significance, server_round
            )
            if ci is not None:
                significant = ci["low"] > 0
                trigger = significant
        return Decision(
            self.metric, value, ref, ref_round, drop, abs_drop, trigger, ci, significant
        )

    def is_drop(self, value: float, reference: float) -> bool:
        """The user's rule: more than ``max_drop`` below ``reference``, and ``min_abs_drop``."""
        if reference <= 0:
            return False
        return (reference - value) / reference > self.max_drop and (
            reference - value >= self.min_abs_drop
        )

    def accept(self, server_round: int, metrics: dict) -> bool:
        """Record an accepted round; True when it is the new best."""
        s = self.state
        value = float(metrics[self.metric])
        s.previous_round, s.previous_value = server_round, value
        s.consecutive = 0
        self.images["previous"] = metrics.get("images")
        if s.best_value is None or value > s.best_value:
            s.best_round, s.best_value = server_round, value
            self.images["best"] = metrics.get("images")
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

    def contributions(self, server_round: int, everyone: dict, without: dict[str, dict]) -> dict:
        """Per client k: ``gain`` = metric(aggregate without k) - metric(aggregate of all), its
        paired-bootstrap interval, ``suspicious`` (the aggregate is significantly better
        without k: the gain's one-sided lower bound is above 0) and ``flagged`` (suspicious in
        this round and in the last round before it that k took part in). No effect-size floor:
        a client of four training on wrong labels cost the aggregate 1-4 % a round
        (benchmarks/faults.py), far below the rollback rule's 10 %; removing an honest client
        makes the aggregate worse, not better, in the same runs."""
        alpha = self.significance if self.significance is not None else 0.05
        out = {}
        for k, res in without.items():
            gain = float(res[self.metric]) - float(everyone[self.metric])
            ci = None
            if everyone.get("images") and res.get("images"):
                ci = paired_drop(
                    res["images"], everyone["images"], self.metric, self.bootstrap, alpha,
                    server_round * 1000 + len(out),
                )  # fmt: skip
            out[k] = self.score(server_round, k, gain, ci)
        return out

    def score(self, server_round: int, client: str, gain: float, ci: dict | None) -> dict:
        """The flag rule on one client's leave-one-out ``gain`` and its interval ``ci`` (also
        what ``benchmarks/faults.py`` replays on recorded scores)."""
        s = self.state
        suspicious = bool(ci is not None and ci["low"] > 0 and gain > 0)
        before = s.participated.get(client)
        flagged = suspicious and before is not None and s.suspicious.get(client) == before
        s.participated[client] = server_round
        if suspicious:
            s.suspicious[client] = server_round
        return {"gain": gain, "ci": ci, "suspicious": suspicious, "flagged": flagged}

    def flag(self, server_round: int, client: str) -> int | None:
        """Record a flagged client; under policy ``exclude`` it sits out the next rounds."""
        self.state.flags += 1
        if self.policy != "exclude":
            return None
        until = server_round + self.exclude_rounds
        self.state.excluded[str(client)] = until
        return until

    def should_stop(self) -> bool:
        return self.stop_after is not None and self.state.consecutive >= self.stop_after

    def excluded(self, server_round: int) -> set[str]:
        """Clients left out of ``server_round`` (policy ``exclude``)."""
        return {c for c, until in self.state.excluded.items() if server_round <= until}

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, d: dict) -> None:
        self.state = GuardState(**d)  # a state saved before a field existed gets its default


def save_images(path, images: dict) -> None:
    """Write one evaluation's per-image matches (``evaluate_checkpoint(keep_images=True)``) as
    a plain ``.npz`` (no pickle): the arrays concatenated, with each image's offsets. What
    ``output.save_matches`` keeps per round, so a rule can be replayed on a finished run
    (``benchmarks/guard_replay.py``)."""
    from pathlib import Path

    def flat(key: str, width: int | None = None):
        parts = [np.asarray(a) for a in images[key]]
        sizes = np.array([len(a) for a in parts], dtype=np.int64)
        empty = np.zeros((0, width) if width else (0,))
        return (np.concatenate(parts) if parts else empty), np.concatenate([[0], np.cumsum(sizes)])

    tp, pred_at = flat("tp", 10)
    conf, _ = flat("conf")
    pred_cls, _ = flat("pred_cls")
    target_cls, target_at = flat("target_cls")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        names=np.array(images["names"], dtype=str),
        tp=tp.astype(bool),
        conf=conf.astype(np.float32),
        pred_cls=pred_cls.astype(np.float32),
        target_cls=target_cls.astype(np.float32),
        pred_at=pred_at,
        target_at=target_at,
    )
    tmp.replace(path)


def load_images(path) -> dict:
    """The per-image matches ``save_images`` wrote."""
    with np.load(path, allow_pickle=False) as z:
        pa, ta = z["pred_at"], z["target_at"]
        n = len(z["names"])
        return {
            "names": [str(x) for x in z["names"]],
            **{k: [z[k][pa[i] : pa[i + 1]] for i in range(n)] for k in ("tp", "conf", "pred_cls")},
            "target_cls": [z["target_cls"][ta[i] : ta[i + 1]] for i in range(n)],
        }


def _map(images: dict, idx: np.ndarray, metric: str) -> float:
    """mAP50-95 (or mAP50) of the images ``idx`` (repeats allowed), as Ultralytics computes it."""
    from ultralytics.utils.metrics import ap_per_class

    target = np.concatenate([images["target_cls"][i] for i in idx])
    if target.size == 0:
        return 0.0
    tp = np.concatenate([images["tp"][i] for i in idx])
    conf = np.concatenate([images["conf"][i] for i in idx])
    pred = np.concatenate([images["pred_cls"][i] for i in idx])
    ap = ap_per_class(tp, conf, pred, target)[5]  # (classes with targets, 10 IoU thresholds)
    if not len(ap):
        return 0.0
    return float(ap[:, 0].mean() if metric == "map50" else ap.mean())


def paired_drop(
    reference: dict, candidate: dict, metric: str, resamples: int, alpha: float, seed: int
) -> dict | None:
    """Bootstrap of ``metric(reference) - metric(candidate)`` over the held-out images, paired
    (both models on the same resampled images): its ``alpha`` and ``1 - alpha`` quantiles.
    None when the two were not evaluated on the same images in the same order."""
    if reference["names"] != candidate["names"] or not reference["names"]:
        return None
    t0 = time.perf_counter()
    n = len(reference["names"])
    rng = np.random.default_rng(seed)
    diffs = np.array(
        [
            _map(reference, idx, metric) - _map(candidate, idx, metric)
            for idx in rng.integers(0, n, (resamples, n))
        ]
    )
    return {
        "low": float(np.quantile(diffs, alpha)),
        "high": float(np.quantile(diffs, 1 - alpha)),
        "level": 1 - alpha,
        "resamples": resamples,
        "images": n,
        "seconds": time.perf_counter() - t0,
    }


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
