"""The guard's rule and its state: keep a round's global model, put it on probation or roll it
back (``Guard.check``, ``Guard.accept``, ``Guard.rolled_back``), and score each client's
contribution (``Guard.contributions``). What the rule is and why: ``fl_server.guard``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fl_server.guard.stats import _interval, joint_gains, paired_drop


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
    # guard.contribution: the clients scored by leave-one-out this round (at most
    # guard.contribution_sample of them); None when nothing was scored (off, or < 3 updates)
    contribution_scored: int | None = None

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
        # every key is required: defaults live in configs/config.yaml, an old run's in
        # fl_server.config.migrate; a missing one is a bug, not a value to guess
        sig = cfg["significance"]
        self.significance = None if sig is None else float(sig)
        self.bootstrap = int(cfg["bootstrap"])
        self.contribution = bool(cfg["contribution"])
        self.contribution_sample = int(cfg["contribution_sample"])  # 0: every client
        self.min_flag_gain = float(cfg["min_flag_gain"])
        agree = cfg["flag_agreement"]
        self.flag_agreement = None if agree is None else float(agree)
        self.patience = int(cfg["patience"])
        severe = cfg["severe_drop"]
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

    def to_score(self, clients: Iterable[str], agreement: dict[str, float | None]) -> list[str]:
        """The clients ``guard.contribution`` scores by leave-one-out this round, of the round's
        repliers ``clients`` (sorted): all of them when there are at most
        ``guard.contribution_sample`` (0: no limit), else that many (``sample``), picked from
        evidence the server holds without evaluating anything:

        1. *watched*, at most ``sample - max(1, sample // 2)`` of them: the clients this round's
           flag could name, i.e. whose update pulls against the others' (``agreement[k]``,
           ``update_agreement``, below ``guard.flag_agreement``; every client when that is
           null): first those whose last scored gain was above 0 (evidence pending for the
           two-participation rule), then the lowest agreement. A client whose update pulls
           with the others cannot be flagged this round, whatever its leave-one-out gain, so
           it needs no slot out of turn;
        2. the rest (at least ``max(1, sample // 2)``) in *rotation*: the least recently scored
           first (never scored before all), then the lowest agreement. Each round the rotation
           scores only clients scored no later than any it passes over, so when the same K
           clients reply every round each is scored at least every ``ceil(K / r)`` rounds, r
           the rotation's slots: ``ceil(K / sample)`` while nobody is watched, at worst
           ``ceil(K / max(1, sample // 2))``. In a fleet that samples its clients the bound is
           in rounds, not participations: a client that replies rarely is, when it does, among
           the least recently scored.

        The flag rule reads a client's last two *scored* participations (``contributions``)."""
        ids = sorted(str(k) for k in clients)
        sample = self.contribution_sample
        if sample == 0 or len(ids) <= sample:
            return ids
        s = self.state
        agree = {k: agreement.get(k) for k in ids}

        def lowest(k: str) -> float:
            return agree[k] if agree[k] is not None else float("inf")

        def pending(k: str) -> bool:
            last = s.gains.get(k)
            return last is not None and last["gain"] > 0

        watchable = [
            k
            for k in ids
            if self.flag_agreement is None
            or (agree[k] is not None and agree[k] < self.flag_agreement)
        ]
        watched = sorted(watchable, key=lambda k: (not pending(k), lowest(k), k))
        picked = watched[: sample - max(1, sample // 2)]
        rest = sorted(
            (k for k in ids if k not in picked),
            key=lambda k: (s.participated.get(k, -1), lowest(k), k),
        )
        return sorted(picked + rest[: sample - len(picked)])

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
        the last round before it that k was scored in, summed resample by resample. ``without``
        holds the clients scored this round (``to_score``: all of them unless the round has more
        than ``guard.contribution_sample``); a client's participations left unscored are not
        evidence, so "two participations" below are its last two *scored* ones.

        k is ``flagged`` when ``ci_2``'s lower bound is above 0 (over its last two
        participations, the aggregate would have been significantly better without it) and
        ``gain_2`` is at least ``guard.min_flag_gain`` (significant is not enough: at mAP
        ~0.004, at the onset of learning, an honest client's +0.003 was significant), and
        this round its ``gain`` is not below 0 (a client that hurt once and helps now is not
        flagged again on old evidence) and above the other scored clients' median
        (``vs_others`` > 0:
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
