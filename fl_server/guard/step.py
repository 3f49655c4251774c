"""The guard step: the drift guard's part of a round, one call from the round loop.

Given the round's evaluated global model and what the grid saw (``RoundLog``), ``GuardStep``
keeps the evaluation's per-image matches (``output.save_matches``), asks the rule
(``Guard.check``), says a drop within the noise or on probation, scores the clients'
contributions (``guard.contribution``: every client, or a sample of them), and rolls back
(searching the culprits under ``guard.policy=exclude``) or accepts, each with its event. It
also keeps, while a drop is on probation, the round log whose replies a later rollback
searches, and frees the others.

The round loop (``fl_server.federation``) owns the global model: on a rollback the step calls its
``restore_best`` (the best weights and strategy state back, ``best.pt`` over ``last.pt``) before it
records the rollback; an accepted model is adopted by the loop from the returned ``Verdict``.
Unlike the rest of ``fl_server.guard`` this module builds models (torch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from fl_client.model import WEIGHTS_KEY, bn_spread, record_digest
from fl_server.guard.attribution import Attribution, attribute
from fl_server.guard.contributions import update_agreement
from fl_server.guard.matches import save_images
from fl_server.guard.rule import Decision, Guard
from fl_server.observed_grid import RoundLog
from fl_server.records import EventKind
from fl_server.run_dir import RunDir

LOGGER = logging.getLogger("fedyolo")

# the server-side evaluation: weights → metrics (with "images"), written to a checkpoint first
Evaluate = Callable[[ArrayRecord, Path, int], dict]
# strategy.bn_stats=pooled: the masks of the running means and variances (fl_client.model)
BnPooled = tuple[np.ndarray, np.ndarray] | None


@dataclass
class Verdict:
    """What the guard step decided about a round's global model."""

    decision: Decision
    improved: bool = False  # accepted, and the best model so far (it becomes ``best.pt``)
    contribution_seconds: float | None = None  # guard.contribution's cost this round


class GuardStep:
    """The drift guard's side of every round (``fl_server.guard``), with its events."""

    def __init__(
        self,
        run: RunDir,
        guard: Guard,
        evaluate: Evaluate,
        cls_mask: np.ndarray,
        save_matches: bool,
        restore_best: Callable[[], ArrayRecord],
        bn_pooled: BnPooled = None,
    ):
        self.run, self.guard, self.evaluate = run, guard, evaluate
        self.bn_pooled = bn_pooled  # leave-one-out aggregates pool BN variances as the strategy
        self.cls_mask = cls_mask  # the contribution's cls_agreement (update_agreement)
        self.keep_matches = save_matches
        self.restore_best = restore_best
        # the round a drop on probation began in, and its decision: a rollback that confirms
        # the drop searches that round's replies for culprits (its updates are kept till then)
        self.drop_began: tuple[int, Decision] | None = None

    @property
    def needs_updates(self) -> bool:
        """Whether the grid keeps each round's returned weights: policy ``exclude`` scores each
        reply on the held-out set to find culprits, and so does ``guard.contribution``."""
        return self.guard.enabled and (self.guard.policy == "exclude" or self.guard.contribution)

    # -- once a round --------------------------------------------------------------------------
    def __call__(
        self,
        rnd: int,
        res: dict,
        rounds: dict[int, RoundLog],
        sent: ArrayRecord,
        final: bool,
    ) -> Verdict:
        """Judge round ``rnd``'s evaluated model ``res`` (``rounds``: the grid's round logs;
        ``sent``: the global model this round's clients trained from)."""
        self.save_matches(res, rnd)
        decision = self.guard.check(rnd, res, final=final)
        if decision.significant is False:
            self._noise_event(rnd, decision)
        if decision.probation:
            self._probation_event(rnd, decision)
        verdict = Verdict(decision)
        if self.guard.enabled and self.guard.contribution:
            # also in a rolled-back round: evidence all the same
            verdict.contribution_seconds, decision.contribution_scored = self._contributions(
                rnd, rounds.get(rnd), sent
            )
        if decision.rolled_back:
            self._rollback(rnd, res, decision, rounds)
        else:
            verdict.improved = self.guard.accept(rnd, res, probation=decision.probation)
        self._release(rnd, decision, rounds)
        return verdict

    def excluded(self, rnd: int) -> set[str]:
        """Clients left out of round ``rnd`` (``guard.policy=exclude``), said in an event."""
        excluded = self.guard.excluded(rnd)
        if excluded:
            self.run.event(rnd, EventKind.CLIENTS_EXCLUDED, clients=sorted(excluded))
        return excluded

    def should_stop(self, rnd: int) -> bool:
        """After ``guard.stop_after`` consecutive rollbacks the run stops, said in an event."""
        if not self.guard.should_stop():
            return False
        reason = (
            f"{self.guard.state.consecutive} consecutive rollbacks "
            f"(guard.stop_after={self.guard.stop_after}); the global model is the best "
            f"checkpoint, round {self.guard.state.best_round}"
        )
        LOGGER.warning("stopping the run: %s", reason)
        self.run.event(rnd, EventKind.GUARD_STOP, reason=reason)
        return True

    def reload_reference(self, best: ArrayRecord, last: ArrayRecord, rnd: int) -> None:
        """On resume: the reference's per-image matches are not in the state, so the reference
        model (``best`` or ``last``, after ``guard.reference``) is evaluated once again."""
        if self.guard.enabled and self.guard.significance is not None:
            ref = best if self.guard.reference == "best" else last
            res = self.evaluate(ref, self.run.reference, rnd)
            self.guard.images[self.guard.reference] = res.get("images")

    def save_matches(self, res: dict, rnd: int, model: str = "") -> None:
        """``output.save_matches``: keep an evaluation's per-image matches in
        ``eval/round_NNNN[_model].npz`` (``fl_server.guard.save_images``), so the guard's rules
        can be replayed on the finished run."""
        if self.keep_matches and res.get("images"):
            suffix = f"_{model}" if model else ""
            save_images(self.run.eval_matches / f"round_{rnd:04d}{suffix}.npz", res["images"])

    # -- what the rule decided, said -----------------------------------------------------------
    def _warn(self, rnd: int, kind: EventKind, reason: str, **fields) -> None:
        """A guard event worth a warning: logged, and in events.jsonl with its evidence."""
        LOGGER.warning("round %d: %s", rnd, reason)
        self.run.event(rnd, kind, reason=reason, **fields)

    def _noise_event(self, rnd: int, decision: Decision) -> None:
        """The user's rule fired but the drop is within the held-out set's noise: accepted,
        and said so with the evidence."""
        ci = decision.drop_ci
        reason = (
            f"{decision.describe()}, but not significantly: "
            f"the drop's {ci['level']:.0%} lower bound is {ci['low']:.4f} <= 0 (paired bootstrap "
            f"over {ci['images']} held-out images, guard.significance={self.guard.significance}); "
            "accepted"
        )
        LOGGER.info("round %d: %s", rnd, reason)
        self.run.event(rnd, EventKind.DROP_WITHIN_NOISE, reason=reason, drop_ci=ci)

    def _probation_event(self, rnd: int, decision: Decision) -> None:
        """The rule fired, significantly, but the drop is not severe: accepted on probation
        (training continues from it; it is neither the reference nor best.pt), and said so."""
        ci = decision.drop_ci
        reason = (
            decision.describe()
            + (f", significantly (lower bound {ci['low']:.4f})" if ci else "")
            + (
                f", less than guard.severe_drop={self.guard.severe_drop:.0%}"
                if self.guard.severe_drop is not None
                else ""
            )
            + f": on probation ({self.guard.state.probation + 1} of guard.patience="
            f"{self.guard.patience} round(s));"
            " a further drop below the reference rolls back to the best checkpoint"
        )
        self._warn(
            rnd,
            EventKind.DROP_ON_PROBATION,
            reason=reason,
            **decision.evidence(),
            drop_ci=ci,
        )

    # -- rollback ------------------------------------------------------------------------------
    def _rollback(
        self, rnd: int, res: dict, decision: Decision, rounds: dict[int, RoundLog]
    ) -> None:
        held = self.guard.state.probation  # rounds on probation before this one
        searched, scored = rnd, decision
        if held and self.drop_began and rounds.get(self.drop_began[0]):
            # the drop began on probation: the replies that caused it are that round's (this
            # round's clients all trained from the dropped model)
            searched, scored = self.drop_began
        log = rounds.get(searched)
        attribution = None
        if self.guard.policy == "exclude" and log and log.updates:
            attribution = self._attribute(log, scored, searched)
        culprits = attribution.culprits if attribution else []
        best_arrays = self.restore_best()
        changes = self.guard.rolled_back(rnd, culprits)
        ci = decision.drop_ci
        reason = (
            f"{decision.describe()}; limit guard.max_drop={self.guard.max_drop} and "
            f"guard.min_abs_drop={self.guard.min_abs_drop}"
            + (
                f"; significant: the drop's {ci['level']:.0%} lower bound is {ci['low']:.4f} > 0 "
                f"(paired bootstrap, {ci['images']} held-out images)"
                if ci
                else ""
            )
            + (
                f"; below it since round {rnd - held}, past guard.patience={self.guard.patience}"
                if held
                else ""
            )
            + f": rolled back to round {self.guard.state.best_round}"
        )
        self._warn(
            rnd,
            EventKind.ROLLBACK,
            reason=reason,
            **decision.evidence(),
            rejected_sha256=res["weights_sha256"],
            restored_round=self.guard.state.best_round,
            after_probation_rounds=held,
            attributed_round=searched if attribution else None,
            restored_sha256=record_digest(best_arrays),
            culprits=culprits,
            # first search step: each client id → the metric of the aggregate without it
            client_scores=attribution.steps[0] if attribution and attribution.steps else None,
            attribution=attribution.as_dict() if attribution else None,
            **changes,
        )

    def _attribute(self, log: RoundLog, decision: Decision, rnd: int) -> Attribution:
        """Leave-one-out over the round's replies (``fl_server.guard.attribute``).

        The aggregate without a client is the example-weighted mean of the others' returned
        models: FedAvg's rule, used for every strategy as the measure of what a client moved.
        """
        ids = [k for k in sorted(log.updates) if k in {str(e["id"]) for e in log.clients}]
        path = self.run.client_update

        def score_without(excluded: frozenset[str]) -> float:
            record = mean_without(log, excluded, self.bn_pooled)
            return float(self.evaluate(record, path, rnd)[self.guard.metric])

        t0 = time.perf_counter()
        found = attribute(
            ids,
            decision.value,
            decision.reference,
            score_without,
            restored=lambda v: not self.guard.is_drop(v, decision.reference),
        )
        path.unlink(missing_ok=True)
        LOGGER.info(
            "round %d: leave-one-out over %d replies in %.1f s: culprits %s",
            rnd,
            len(ids),
            time.perf_counter() - t0,
            found.culprits or "none",
        )
        return found

    def _release(self, rnd: int, decision: Decision, rounds: dict[int, RoundLog]) -> None:
        """Free the round logs (and their kept updates) no rollback will search: all up to
        ``rnd`` but the round a drop on probation began in."""
        if decision.probation and self.drop_began is None:
            self.drop_began = (rnd, decision)  # its updates are kept for a culprit search
            return
        if not decision.probation:
            self.drop_began = None
        kept = {self.drop_began[0]} if self.drop_began else set()
        for r in [r for r in rounds if r <= rnd and r not in kept]:
            rounds.pop(r)  # frees kept updates

    # -- contributions -------------------------------------------------------------------------
    def _contributions(
        self, rnd: int, log: RoundLog | None, sent: ArrayRecord
    ) -> tuple[float | None, int | None]:
        """``guard.contribution``: what each client did to this round's aggregate, on the
        held-out set (``fl_server.guard.Guard.contributions``): the mean of every reply and the
        mean without client k are evaluated, for every k when the round has at most
        ``guard.contribution_sample`` replies, else for that many, picked from the updates
        alone (``Guard.to_score``); k is flagged when, over its last two scored
        participations, the aggregate would have been significantly better without it (paired
        bootstrap), and this round it did not help and did less than the other clients. Each
        client's entry in ``metrics.jsonl`` gets ``loo_scored`` and its ``cls_agreement``, a
        scored one its ``loo_gain``, ``loo_gain_2`` (two participations), their intervals and
        ``loo_vs_others``; a flag is a ``client_flagged`` event with the evidence, and under
        ``guard.policy=exclude`` the client sits out ``guard.exclude_rounds`` rounds. Returns
        the seconds it took and the clients scored (None, None: fewer than three updates,
        nothing scored)."""
        if log is None or len(log.updates) < 3:
            return None, None
        t0 = time.perf_counter()
        path = self.run.client_update
        base = sent[WEIGHTS_KEY].numpy().reshape(-1)  # the model this round was sent
        agreement = update_agreement(base, log.updates, self.cls_mask)
        ids = sorted(log.updates)
        scored = self.guard.to_score(ids, agreement)
        # every client scored: each mean summed as it always was (the same bits); a sample: the
        # round's weighted sum once, each mean without k from it (not K updates per mean)
        mean = (
            partial(mean_without, log, bn_pooled=self.bn_pooled)
            if len(scored) == len(ids)
            else WeightedSum(log, self.bn_pooled)
        )
        everyone = self.evaluate(mean(frozenset()), path, rnd)
        without = {k: self.evaluate(mean(frozenset({k})), path, rnd) for k in scored}
        path.unlink(missing_ok=True)
        self.save_matches(everyone, rnd, "all")
        for k, res in without.items():
            self.save_matches(res, rnd, f"without_{k}")
        scores = self.guard.contributions(rnd, everyone, without, agreement)
        seconds = time.perf_counter() - t0
        for entry in log.clients:
            k = str(entry["id"])
            if k not in log.updates:
                continue
            sc = scores.get(k)
            entry["loo_scored"] = sc is not None
            if sc is not None:
                entry["loo_gain"] = sc["gain"]
                entry["loo_ci"] = sc["ci"]
                entry["loo_gain_2"] = sc["gain_2"]
                entry["loo_ci_2"] = sc["ci_2"]
                entry["loo_vs_others"] = sc["vs_others"]
            entry["cls_agreement"] = agreement.get(k)
        for k, sc in scores.items():
            if sc["flagged"]:
                self._flag(rnd, k, sc, scores, everyone, without[k], seconds)
        LOGGER.info(
            "round %d: contributions of %d of %d clients in %.1f s",
            rnd,
            len(scores),
            len(ids),
            seconds,
        )
        return seconds, len(scores)

    def _flag(
        self,
        rnd: int,
        k: str,
        sc: dict,
        scores: dict,
        everyone: dict,
        without_k: dict,
        seconds: float,
    ) -> None:
        """A ``client_flagged`` event with its evidence (and the client's exclusion)."""
        m, ci2 = self.guard.metric, sc["ci_2"]
        reason = (
            f"client {k}: leaving its update out would have raised the aggregate's {m} by "
            f"{sc['gain_2']:+.4f} over rounds {ci2['rounds'][0]} and {ci2['rounds'][1]} "
            f"({ci2['level']:.0%} lower bound {ci2['low']:+.4f} > 0; this round "
            f"{everyone[m]:.4f} with it, {without_k[m]:.4f} without: it did not help, and "
            f"less than the other clients) (guard.contribution)"
        )
        self._warn(
            rnd,
            EventKind.CLIENT_FLAGGED,
            client=k,
            reason=reason,
            scores={c: v["gain"] for c, v in scores.items()},
            evidence=sc,
            excluded_until_round=self.guard.flag(rnd, k),
            seconds=seconds,
        )


def mean_without(
    log: RoundLog, excluded: frozenset[str], bn_pooled: BnPooled = None
) -> ArrayRecord:
    """The example-weighted mean of the round's returned models, without ``excluded``:
    FedAvg's rule, used for every strategy as the measure of what a client moved; with
    ``bn_pooled`` (``strategy.bn_stats=pooled``: the means' and variances' masks) each running
    variance is pooled over the clients kept, as the strategy's aggregate's is."""
    weights = {str(e["id"]): max(1, int(e["num_examples"])) for e in log.clients}
    keep = [k for k in sorted(log.updates) if k in weights and k not in excluded]
    total = float(sum(weights[k] for k in keep))
    mean = sum((weights[k] / total) * log.updates[k].astype(np.float64) for k in keep)
    if bn_pooled is not None and keep:
        means, variances = bn_pooled
        w = np.asarray([weights[k] / total for k in keep])
        mean[variances] += bn_spread(np.stack([log.updates[k][means] for k in keep]), w)
    return ArrayRecord({WEIGHTS_KEY: Array(np.asarray(mean, dtype=np.float32))})


class WeightedSum:
    """The round's example-weighted sum of the returned models, summed once (float64), and each
    mean without some clients from it: ``mean_without``'s value (to float64 rounding) in one pass
    over the K updates plus one per mean, where ``mean_without`` passes over all K per mean."""

    def __init__(self, log: RoundLog, bn_pooled: BnPooled = None):
        self.log, self.bn_pooled = log, bn_pooled
        self.weights = {str(e["id"]): max(1, int(e["num_examples"])) for e in log.clients}
        self.keep = [k for k in sorted(log.updates) if k in self.weights]
        self.total = float(sum(self.weights[k] for k in self.keep))
        self.sum = np.zeros(log.updates[self.keep[0]].shape, np.float64)
        for k in self.keep:
            self.sum += self.weights[k] * log.updates[k].astype(np.float64)
        if bn_pooled is not None:  # Σ w·mean²: the pooled variance is E[m²] − E[m]² on top
            self.squares = sum(self.weights[k] * self._means(k) ** 2 for k in self.keep)

    def _means(self, k: str) -> np.ndarray:
        return self.log.updates[k][self.bn_pooled[0]].astype(np.float64)

    def __call__(self, excluded: frozenset[str]) -> ArrayRecord:
        out, total = self.sum.copy(), self.total
        squares = self.squares.copy() if self.bn_pooled is not None else None
        for k in (k for k in self.keep if k in excluded):
            out -= self.weights[k] * self.log.updates[k].astype(np.float64)
            total -= self.weights[k]
            if squares is not None:
                squares -= self.weights[k] * self._means(k) ** 2
        out /= total
        if squares is not None:
            means, variances = self.bn_pooled
            out[variances] += np.maximum(squares / total - out[means] ** 2, 0.0)
        return ArrayRecord({WEIGHTS_KEY: Array(np.asarray(out, dtype=np.float32))})
