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
set's own noise is not a rollback. It is computed only when the rule above fires.

Then training noise: honest FedAvg rounds dip by more than 10 %, significantly on the held-out
images, and recover the next round (benchmarks/guard_replay.py). So a significant drop of less
than ``guard.severe_drop`` (relative, default 50 %) is put *on probation* for ``guard.patience``
rounds: it is accepted as the global model that training continues from, but it never becomes
the reference nor ``best.pt``, and the round's metrics say so; if the next round is still a
significant drop below the reference, that round rolls back; so does a drop in the run's last
round (nothing is left to confirm it: a run never ends on a model on probation). A drop of
``severe_drop`` or more (every weight fault in benchmarks/faults.py collapsed the mAP to ~0), or
a metric that is not finite, rolls back at once (``severe_drop=null``: only the latter).
``guard.patience=0``: every drop rolls back at once. Then the policy:

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
    # the rule fired (significantly) but the drop is not severe and the guard's patience is not
    # spent: accepted on probation (training continues from it; never a reference nor best.pt)
    probation: bool = False

    def as_dict(self) -> dict:
        kind = "rollback" if self.rolled_back else "probation" if self.probation else "accept"
        return {"decision": kind, **asdict(self)}

    def describe(self) -> str:
        """How far below the reference, the start of every guard event's reason."""
        return (
            f"{self.metric} {self.value:.4f} is {self.drop:.1%} below the reference "
            f"{self.reference:.4f} (round {self.reference_round})"
        )

    def evidence(self) -> dict:
        """The numbers every guard event carries."""
        return {
            "metric": self.metric,
            "value": self.value,
            "reference": self.reference,
            "reference_round": self.reference_round,
            "drop": self.drop,
        }


@dataclass
class GuardState:
    best_round: int | None = None
    best_value: float | None = None
    previous_round: int | None = None
    previous_value: float | None = None
    consecutive: int = 0
    rollbacks: int = 0
    probation: int = 0  # consecutive rounds accepted on probation (guard.patience)
    lr_scale: float = 1.0
    excluded: dict[str, int] = field(default_factory=dict)  # client id → last excluded round
    suspicious: dict[str, int] = field(default_factory=dict)  # client id → last flagged round
    participated: dict[str, int] = field(default_factory=dict)  # client id → last scored round
    # client id → its last scored round's leave-one-out gain and bootstrap samples
    gains: dict[str, dict] = field(default_factory=dict)
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
        self.min_flag_gain = float(cfg.get("min_flag_gain") or 0.0)
        agree = cfg.get("flag_agreement")
        self.flag_agreement = None if agree is None else float(agree)
        self.patience = int(cfg.get("patience") or 0)
        severe = cfg.get("severe_drop", 0.5)
        self.severe_drop = None if severe is None else float(severe)
        self.state = GuardState()
        # the reference rounds' per-image matches (not saved: re-evaluated on resume)
        self.images: dict[str, dict | None] = {"best": None, "previous": None}

    def check(self, server_round: int, metrics: dict, final: bool = False) -> Decision:
        """Compare this round's metric with the reference; does not change any state. In the
        run's ``final`` round no drop is put on probation (no round is left to confirm it)."""
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
        severe = trigger and (
            not np.isfinite(value) or (self.severe_drop is not None and drop >= self.severe_drop)
        )
        if (
            trigger
            and np.isfinite(value)
            and self.significance is not None
            and ref_images
            and images
        ):
            ci = paired_drop(
                ref_images, images, self.metric, self.bootstrap, self.significance, server_round
            )
            if ci is not None:
                significant = ci["low"] > 0
                trigger = significant
        probation = trigger and not severe and not final and s.probation < self.patience
        return Decision(
            self.metric,
            value,
            ref,
            ref_round,
            drop,
            abs_drop,
            trigger and not probation,
            ci,
            significant,
            probation,
        )

    def is_drop(self, value: float, reference: float) -> bool:
        """The user's rule: more than ``max_drop`` below ``reference``, and ``min_abs_drop``."""
        if reference <= 0:
            return False
        if not np.isfinite(value):
            return True
        return (reference - value) / reference > self.max_drop and (
            reference - value >= self.min_abs_drop
        )

    def accept(self, server_round: int, metrics: dict, probation: bool = False) -> bool:
        """Record an accepted round; True when it is the new best. A round accepted on
        probation (``Decision.probation``) is not a reference: only the count moves."""
        s = self.state
        s.consecutive = 0
        if probation:
            s.probation += 1
            return False
        s.probation = 0
        value = float(metrics[self.metric])
        s.previous_round, s.previous_value = server_round, value
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
        s.probation = 0
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

    def contributions(
        self,
        server_round: int,
        everyone: dict,
        without: dict[str, dict],
        agreement: dict[str, float | None] | None = None,
    ) -> dict:
        """Per client k: ``gain`` = metric(aggregate without k) - metric(aggregate of all), with
        its paired-bootstrap interval ``ci`` (every model on the same resampled held-out images,
        the same resamples every round), and ``gain_2``/``ci_2``: the gains of this round and of
        the last round before it that k took part in, summed resample by resample.

        k is ``flagged`` when ``ci_2``'s lower bound is above 0 (over its last two
        participations, the aggregate would have been significantly better without it) and
        ``gain_2`` is at least ``guard.min_flag_gain`` (significant is not enough: at mAP
        ~0.004, at the onset of learning, an honest client's +0.003 was significant), and
        this round its ``gain`` is not below 0 (a client that hurt once and helps now is not
        flagged again on old evidence) and above the other clients' median (``vs_others`` > 0:
        a round where every removal helps alike names nobody), and, with
        ``guard.flag_agreement`` set, its update pulls against the others' on the detection
        layer's classification branch (``agreement[k]``: ``update_agreement``, below that
        value; a client without one is not flagged). Why the agreement: leave-one-out on a
        held-out set cannot tell a client training on wrong labels from an honest one whose
        data differ from the held-out mix, or one that happened to help least twice running
        (benchmarks: honest clients of non-IID and of iid fleets flagged); a client training
        on shifted labels pulled its class branch against every other client's (median cosine
        -0.02 to -0.67) while honest clients, domain-shifted ones included, pulled with them
        (see README). Why two rounds summed: in the
        slow-poisoning benchmark (benchmarks/faults.py) the poisoned client's removal gained
        +0.04 in its first round and then 0 to +0.03 a round, often not significant alone,
        while every honest client's removal cost; a single-round rule comparing each client
        with the others flagged two honest clients in the honest twin run (which client helps
        most moves from round to round)."""
        alpha = self.significance if self.significance is not None else 0.05
        s = self.state
        clients = sorted(without)
        gains = {k: float(without[k][self.metric]) - float(everyone[self.metric]) for k in clients}
        boot = None
        if everyone.get("images") and all(without[k].get("images") for k in clients):
            boot = joint_gains(
                everyone["images"],
                [without[k]["images"] for k in clients],
                self.metric,
                self.bootstrap,
                seed=0,  # the same resamples every round: two rounds' gains pair up
            )
        out = {}
        for i, k in enumerate(clients):
            gain = gains[k]
            vs_others = gain - statistics.median(gains[j] for j in clients if j != k)
            ci = gain_2 = ci_2 = None
            last = s.gains.get(k)
            if boot is not None:
                samples, seconds = boot
                n = len(everyone["images"]["names"])
                ci = _interval(samples[:, i], alpha, n, seconds)
                if last is not None and len(last["samples"]) == len(samples):
                    gain_2 = gain + last["gain"]
                    ci_2 = _interval(samples[:, i] + np.asarray(last["samples"]), alpha, n, seconds)
                    ci_2["rounds"] = [last["round"], server_round]
                s.gains[k] = {
                    "round": server_round,
                    "gain": gain,
                    # an array: the server state stores it as one (binary, exact), not in JSON
                    "samples": samples[:, i].copy(),
                }
            agrees = None if agreement is None else agreement.get(k)
            flagged = bool(
                ci_2 is not None
                and ci_2["low"] > 0
                and gain_2 >= self.min_flag_gain
                and gain >= 0
                and vs_others > 0
                and (
                    self.flag_agreement is None
                    or (agrees is not None and agrees < self.flag_agreement)
                )
            )
            s.participated[k] = server_round
            if flagged:
                s.suspicious[k] = server_round
            out[k] = {
                "gain": gain,
                "ci": ci,
                "gain_2": gain_2,
                "ci_2": ci_2,
                "vs_others": vs_others,
                "agreement": agrees,
                "flagged": flagged,
            }
        return out

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
        conf=conf,  # as the validator made them (float32 there): the same mAP when reloaded
        pred_cls=pred_cls,
        target_cls=target_cls,
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


def replay_contributions(guard: Guard, eval_dir, rounds: list[dict]) -> dict[int, dict]:
    """``guard.contributions`` again, round after round, on a finished run's kept matches
    (``output.save_matches``: ``eval/round_NNNN_all.npz`` and ``..._without_<k>.npz``) and the
    repliers in its ``metrics.jsonl`` records (with their ``cls_agreement``): round → per-client
    scores, for the rounds that kept them. A rule can so be tried on a run after the fact."""
    from pathlib import Path

    eval_dir = Path(eval_dir)
    out = {}
    for rec in sorted(rounds, key=lambda r: r["round"]):
        rnd = rec["round"]
        everyone = eval_dir / f"round_{rnd:04d}_all.npz"
        if not everyone.is_file():
            continue
        ids = [str(c["id"]) for c in rec["clients"]]
        without = {
            k: _scored(load_images(p), guard.metric)
            for k in ids
            if (p := eval_dir / f"round_{rnd:04d}_without_{k}.npz").is_file()
        }
        everyone_res = _scored(load_images(everyone), guard.metric)
        agreement = {str(c["id"]): c.get("cls_agreement") for c in rec["clients"]}
        out[rnd] = guard.contributions(rnd, everyone_res, without, agreement)
    return out


def _scored(images: dict, metric: str) -> dict:
    return {metric: metric_of(images, metric), "images": images}


def metric_of(images: dict, metric: str) -> float:
    """``metric`` over all the images of kept per-image matches: what the evaluation reported."""
    return _map(images, np.arange(len(images["names"])), metric)


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
    return _interval(diffs, alpha, n, time.perf_counter() - t0)


def joint_gains(
    everyone: dict, without: list[dict], metric: str, resamples: int, seed: int
) -> tuple[np.ndarray, float] | None:
    """Bootstrap of ``metric(without[j]) - metric(everyone)`` for every j on the same resampled
    held-out images: a (resamples, len(without)) array, and the seconds it took. None when the
    models were not evaluated on the same images in the same order."""
    names = everyone["names"]
    if not names or any(w["names"] != names for w in without):
        return None
    t0 = time.perf_counter()
    n = len(names)
    rng = np.random.default_rng(seed)
    rows = []
    for idx in rng.integers(0, n, (resamples, n)):
        base = _map(everyone, idx, metric)
        rows.append([_map(w, idx, metric) - base for w in without])
    return np.array(rows), time.perf_counter() - t0


def update_agreement(base: np.ndarray, updates: dict[str, np.ndarray], mask) -> dict[str, float]:
    """Per client k: the median, over the other clients j, of the cosine between k's update
    (its returned weights minus ``base``, the global model it was sent, on ``mask``) and j's.
    The median, not the cosine with the others' mean: one client pulling hard the other way
    would drag that mean, and every honest client's agreement with it, to ~0. Evidence recorded
    next to the contribution score (``cls_agreement``: on the detection layer's classification
    branch, where training on wrong labels pulls against the others)."""
    keys = sorted(updates)
    d = np.stack([updates[k][mask].astype(np.float64) - base[mask] for k in keys])
    norms = np.linalg.norm(d, axis=1)
    norms[norms == 0] = np.inf  # no update: agrees with nobody (cosine 0)
    unit = d / norms[:, None]
    cos = unit @ unit.T
    return {k: float(np.median(np.delete(cos[i], i))) for i, k in enumerate(keys) if len(keys) > 1}


def _interval(samples: np.ndarray, alpha: float, images: int, seconds: float) -> dict:
    """The ``alpha`` and ``1 - alpha`` quantiles of bootstrap ``samples``, with how they were
    obtained (what ``metrics.jsonl`` records as the evidence)."""
    return {
        "low": float(np.quantile(samples, alpha)),
        "high": float(np.quantile(samples, 1 - alpha)),
        "level": 1 - alpha,
        "resamples": len(samples),
        "images": images,
        "seconds": seconds,
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
