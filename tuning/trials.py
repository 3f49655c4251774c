"""Run a study's trials: each one whole federation, until the study holds ``tuning.trials``.

Workers (processes, or hosts sharing an RDB storage) count and ask for trials one at a time
(``tuning.study.Claim``); a trial beyond the total is a surplus, recorded and not counted; a
trial whose worker died is failed as stale and re-run by Optuna's retry callback. Each round's
held-out mAP50-95 goes to the pruner through a round hook.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from fl_client.lazy import lazy
from fl_server.api import run
from fl_server.records import Status
from fl_server.run_dir import RunDir
from tuning.outputs import report_study, write_outputs
from tuning.space import overrides, suggest
from tuning.study import Claim, Study, open_study

optuna = lazy("optuna")

LOGGER = logging.getLogger("fedyolo")


def round_loss(record: dict) -> float | None:
    """The clients' training loss in a round (box + cls + dfl), weighted by their examples;
    None when no client reported a finite one."""
    pairs = [
        (float(c["loss"]), float(c.get("num_examples") or 0))
        for c in record.get("clients") or []
        if c.get("loss") is not None and math.isfinite(float(c["loss"]))
    ]
    weight = sum(n for _, n in pairs)
    if not pairs or weight <= 0:
        return None
    return sum(v * n for v, n in pairs) / weight


# prune_on=map+loss: the loss's weight. Training losses of yolov8n here span ~4-15 (box + cls +
# dfl), so the loss moves the value by at most ~0.01: it orders trials whose mAP is equal (all 0 in
# a detector's first rounds), and a held-out mAP ahead by more than that decides.
LOSS_WEIGHT = 0.001


def pruning_value(prune_on: str, map50_95: float | None, loss: float | None) -> float | None:
    """What a round reports to the pruner for ``tuning.prune_on`` (None: nothing to report)."""
    if prune_on == "map":
        return map50_95
    if loss is None:
        return None
    if prune_on == "loss":
        return -loss
    return None if map50_95 is None else map50_95 - LOSS_WEIGHT * loss


class _Pruning:
    """The round hook of a trial: report each round's value to the pruner, stop when pruned.

    ``prune_on``: ``map``, the round's held-out mAP50-95; ``loss``, minus the clients' training
    loss (``round_loss``), which moves from round 1 while a detector trained from scratch sits at
    mAP 0 for its first rounds; ``map+loss``, the mAP with the loss as its tie-breaker
    (``LOSS_WEIGHT``). See benchmarks/pruning.py. Either way the trial's value, what the study
    ranks, stays its objective on the held-out set.
    """

    def __init__(self, trial: Any, prune_on: str = "map"):
        self.trial = trial
        self.prune_on = prune_on

    def on_round(self, record: dict) -> str | None:
        value = pruning_value(self.prune_on, record.get("map50_95"), round_loss(record))
        if value is None or not math.isfinite(value):
            return None
        self.trial.report(float(value), step=int(record["round"]))
        return Status.PRUNED if self.trial.should_prune() else None


def _values(cfg: DictConfig, summary: Any) -> list[float]:
    work = RunDir(summary.run_dir).client_work()
    out = []
    for objective in cfg.objectives:
        if objective in ("best_map", "final_map"):
            result = summary.best if objective == "best_map" else summary.final
            if result is None:
                raise RuntimeError(f"the federation reported no {objective}")
            out.append(float(result.map50_95))
        elif objective == "bytes":
            out.append(float(work["bytes"]))
        else:
            out.append(float(work["train_seconds"]))
    return out


def run_trial(st: Study, trial: Any) -> list[float]:
    """One federation with the trial's values; raises optuna.TrialPruned when pruned."""
    values = suggest(trial, st.space)
    chosen = overrides(values)
    run_dir = st.trials_dir / f"{trial.number:04d}"
    trial.set_user_attr("overrides", chosen)
    trial.set_user_attr("run_dir", str(run_dir))
    pruning = len(st.cfg.objectives) == 1 and st.cfg.pruner != "none"
    hooks = [_Pruning(trial, str(st.cfg.prune_on))] if pruning else []
    t0 = time.perf_counter()
    summary = run(
        [
            *st.base,
            *chosen,
            f"output.dir={st.trials_dir}",
            f"name={trial.number:04d}",
            f"tracking.task_name={st.optuna_study.study_name}-trial-{trial.number:04d}",
            "output.overwrite=true",  # a retried trial number reuses its folder
        ],
        callbacks=hooks,
    )
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
    trial.set_user_attr("rounds", summary.rounds_completed)
    trial.set_user_attr("status", summary.status)
    trial.set_user_attr("clearml_task", summary.raw.get("clearml_task"))
    if summary.status == Status.PRUNED:
        raise optuna.TrialPruned(f"pruned after round {summary.rounds_completed}")
    if not summary.ok:
        raise RuntimeError(f"the federation ended {summary.status} (see {run_dir})")
    return _values(st.cfg, summary)


def counted(trials: Sequence[Any]) -> list[Any]:
    """The trials that count towards ``tuning.trials``: every trial begun, except one that
    failed as stale (its worker died) and was re-run by Optuna's retry callback.

    A retry of a retry names the original in ``failed_trial``; the chain is its retry history
    (original, first retry, ...), so every trial in some trial's history was re-run."""
    retried = {n for t in trials for n in optuna.storages.RetryFailedTrialCallback.retry_history(t)}
    return [
        t
        for t in trials
        if t.state != optuna.trial.TrialState.WAITING
        and t.number not in retried
        and not t.user_attrs.get(SURPLUS)
    ]


SURPLUS = "surplus"  # a trial asked for after the study was full (workers on several hosts)


def surplus(trials: Sequence[Any], number: int, total: int) -> bool:
    """Whether trial ``number`` is beyond ``tuning.trials``: the lock that makes a worker count
    and ask alone is a file, which workers on other hosts (RDB storage) do not share, so two of
    them can both see one trial left and both ask. Counted after the trial exists, in trial
    order, every worker reaches the same verdict: the later trial is the surplus one."""
    ahead = [t for t in counted(trials) if t.number < number]
    return len(ahead) >= total


def optimize(st: Study) -> None:
    """Run trials until the study holds ``tuning.trials`` (all workers) or the timeout.

    Each trial runs through Optuna's own ``study.optimize``: with an RDB storage that gives the
    trial a heartbeat, fails the trials of dead workers (stale heartbeats) before asking, and
    lets the storage's retry callback re-run them.
    """
    study = st.optuna_study
    total = int(st.cfg.trials)
    deadline = None if st.cfg.timeout is None else time.monotonic() + float(st.cfg.timeout)
    claim = Claim(st.folder)
    while deadline is None or time.monotonic() < deadline:
        claim.acquire()
        try:
            if st.cfg.storage:  # an RDB storage, with heartbeats (see _storage)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
            if len(counted(study.get_trials(deepcopy=False))) >= total:
                break
            study.optimize(
                lambda trial: _objective(st, trial, claim, total),
                n_trials=1,
                catch=(Exception,),
                gc_after_trial=True,
            )
        finally:
            claim.release()
        return_freed_memory()
        write_outputs(st)
    write_outputs(st, plots=True)
    with Claim(st.folder):
        running = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.RUNNING
        ]
        if not running:  # the last worker to finish reports the study
            report_study(st)


def return_freed_memory() -> None:
    """Hand the memory a trial freed back to the system (glibc's ``malloc_trim``).

    Measured (``benchmarks/tuning_memory.py``): without it a worker's RSS grew by 444 MB over 10
    trials before levelling off; with glibc told to trim, it stayed within 7 MB. Freed memory
    that glibc keeps in its arenas, not a leak. Elsewhere (musl, macOS) this does nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Surplus(RuntimeError):
    """A trial beyond ``tuning.trials``: recorded FAIL without running (not counted)."""


def _objective(st: Study, trial: Any, claim: Claim, total: int) -> Any:
    """One trial (Optuna records the outcome): values, ``TrialPruned``, or a failure with its
    reason kept as the trial's ``fail_reason``."""
    claim.release()  # the trial exists: other workers may count and ask
    trials = st.optuna_study.get_trials(deepcopy=False)
    if surplus(trials, trial.number, total):
        trial.set_user_attr(SURPLUS, True)
        reason = f"surplus: the study already had its {total} trials (a worker on another host)"
        trial.set_user_attr("fail_reason", reason)
        raise _Surplus(reason)
    (frozen,) = [t for t in trials if t.number == trial.number]
    retry = optuna.storages.RetryFailedTrialCallback.retried_trial_number(frozen)
    LOGGER.info(
        "study %s: trial %d of %d%s",
        st.optuna_study.study_name,
        trial.number,
        total,
        f" (re-run of trial {retry}, whose worker died)" if retry is not None else "",
    )
    try:
        values = run_trial(st, trial)
    except optuna.TrialPruned as e:
        LOGGER.info("trial %d pruned: %s", trial.number, e)
        raise
    except Exception as e:
        reason = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
        LOGGER.warning("trial %d failed: %s", trial.number, reason)
        trial.set_user_attr("fail_reason", reason)
        raise
    return values if len(values) > 1 else values[0]


def tune(overrides_: Sequence[str]) -> Study:
    """``fedyolo tune``: open (or continue) the study, run its trials, write its outputs."""
    st = open_study(overrides_)
    LOGGER.info("study %s in %s", st.optuna_study.study_name, st.folder)
    optimize(st)
    return st
