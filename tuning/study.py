"""``fedyolo tune``: an Optuna study whose trials are whole federations.

Each trial is ``fl_server.run`` with the base overrides plus the trial's values, into its own
run directory ``runs/<study>/trials/<nnnn>/`` (the usual contract). Every round's held-out
mAP50-95 goes to ``trial.report``; when the pruner says so, a round hook stops the federation
cleanly after that round (status ``pruned``, run directory complete, trial ``PRUNED``). A
federation that fails is a ``FAIL`` trial with its reason, and the study goes on.

The study folder ``runs/<study>/`` holds the storage (a journal file by default, which several
``fedyolo tune`` processes on one host share; or an RDB URL for workers on several machines),
``study.json`` (every trial), ``summary.md``, ``best.yaml`` (the best trial's overrides:
``fedyolo run --from runs/<study>/best.yaml``) and plots. The base configuration's own values
are trial 0, so a study never ends worse than the defaults.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from fl_server.records import Status
from tuning.space import CONFIG_DIR, Param, TuningError, defaults, load_space, overrides, suggest

LOGGER = logging.getLogger("fedyolo")

SAMPLERS = ("tpe", "random", "gp", "cmaes", "nsga2")
PRUNERS = ("median", "hyperband", "successive_halving", "threshold", "none")
# objective -> (direction, what it reads from a finished federation)
OBJECTIVES = {
    "best_map": "maximize",
    "final_map": "maximize",
    "bytes": "minimize",
    "client_seconds": "minimize",
}


def tuning_config(overrides_: Sequence[str]) -> tuple[DictConfig, list[str]]:
    """``configs/tuning/default.yaml`` with the ``tuning.*`` overrides; the rest is the base."""
    cfg = OmegaConf.load(CONFIG_DIR / "tuning" / "default.yaml")
    OmegaConf.set_struct(cfg, True)
    base = []
    for o in overrides_:
        key, sep, value = o.partition("=")
        if not key.startswith("tuning."):
            base.append(o)
            continue
        if not sep or key[len("tuning.") :] not in cfg:
            raise TuningError(f"tuning: unknown setting {key!r} (see configs/tuning/default.yaml)")
        cfg[key[len("tuning.") :]] = yaml.safe_load(value)
    _check(cfg)
    return cfg, base


def _check(cfg: DictConfig) -> None:
    def bad(key: str, expected: str) -> TuningError:
        return TuningError(f"tuning.{key}={cfg[key]!r} is invalid; expected {expected}")

    if not (isinstance(cfg.trials, int) and cfg.trials >= 1):
        raise bad("trials", "an integer >= 1")
    if cfg.timeout is not None and not (isinstance(cfg.timeout, int | float) and cfg.timeout > 0):
        raise bad("timeout", "null or seconds > 0")
    if cfg.sampler not in SAMPLERS:
        raise bad("sampler", f"one of {list(SAMPLERS)}")
    if cfg.pruner not in PRUNERS:
        raise bad("pruner", f"one of {list(PRUNERS)}")
    objectives = list(cfg.objectives) if OmegaConf.is_list(cfg.objectives) else [cfg.objectives]
    if (
        not objectives
        or any(o not in OBJECTIVES for o in objectives)
        or len(set(objectives)) < len(objectives)
    ):
        raise bad("objectives", f"a list of distinct {list(OBJECTIVES)}")
    cfg.objectives = objectives
    if len(objectives) > 1 and cfg.pruner != "none":
        raise TuningError(
            f"tuning: a multi-objective study ({', '.join(objectives)}) cannot be pruned "
            "(Optuna prunes single-objective studies only); set tuning.pruner=none"
        )
    if len(objectives) > 1 and cfg.sampler not in ("nsga2", "random", "tpe"):
        raise bad("sampler", "nsga2, tpe or random for a multi-objective study")
    for key in ("heartbeat_interval", "grace_period"):
        if not (isinstance(cfg[key], int) and cfg[key] >= 1):
            raise bad(key, "whole seconds >= 1")
    if cfg.grace_period <= cfg.heartbeat_interval:
        raise bad("grace_period", f"more than tuning.heartbeat_interval ({cfg.heartbeat_interval})")
    if not (isinstance(cfg.max_retry, int) and cfg.max_retry >= 0):
        raise bad("max_retry", "an integer >= 0")
    if cfg.study is not None and not str(cfg.study).replace("-", "").replace("_", "").isalnum():
        raise bad("study", "letters, digits, '-' and '_'")


@dataclass
class Study:
    """One study: its folder, Optuna study, search space and base configuration."""

    folder: Path
    optuna_study: Any
    cfg: DictConfig
    space: list[Param]
    base: list[str]

    @property
    def trials_dir(self) -> Path:
        return self.folder / "trials"


def open_study(overrides_: Sequence[str]) -> Study:
    """Check everything (one line on any error) and create or continue the study."""
    import optuna

    from fl_server import config as config_mod

    cfg, base = tuning_config(overrides_)
    space = load_space(str(cfg.space))
    base_cfg = config_mod.compose(base)  # a bad base value stops here, before any trial
    start = defaults(space, base_cfg)
    config_mod.compose([*base, *overrides(start)])  # trial 0 composes
    for p in space:  # every conditional key exists under its condition
        if p.when and not p.is_group:
            cond = [f"{k}={v[0]}" for k, v in p.when.items()]
            probe = config_mod.compose([*base, *cond])
            if OmegaConf.select(probe, p.path, default="__missing__") == "__missing__":
                raise TuningError(f"tuning space: {p.path} does not exist under {cond}")
        elif (
            not p.when
            and not p.is_group
            and OmegaConf.select(base_cfg, p.path, default="__missing__") == "__missing__"
        ):
            raise TuningError(f"tuning space: {p.path} is not a config key")
    name = str(cfg.study or time.strftime("tune-%Y%m%d-%H%M%S"))
    folder = Path(str(base_cfg.output.dir)).expanduser().resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    directions = [OBJECTIVES[o] for o in cfg.objectives]
    with _Claim(folder):  # workers starting together create the study and trial 0 once
        study = optuna.create_study(
            study_name=name,
            storage=_storage(cfg, folder),
            sampler=_sampler(cfg),
            pruner=_pruner(cfg, int(base_cfg.federation.rounds)),
            directions=directions,
            load_if_exists=True,
        )
        if not study.trials:
            study.enqueue_trial(start, user_attrs={"origin": "the base configuration's own values"})
    (folder / "tuning.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "base_overrides.yaml").write_text(yaml.safe_dump(list(base)))
    return Study(folder, study, cfg, space, list(base))


def _storage(cfg: DictConfig, folder: Path) -> Any:
    from optuna.storages import JournalStorage, RDBStorage, RetryFailedTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if cfg.storage:
        return RDBStorage(
            str(cfg.storage),
            heartbeat_interval=int(cfg.heartbeat_interval),
            grace_period=int(cfg.grace_period),
            failed_trial_callback=RetryFailedTrialCallback(max_retry=int(cfg.max_retry)),
        )
    return JournalStorage(JournalFileBackend(str(folder / "study.journal")))


def _sampler(cfg: DictConfig) -> Any:
    import optuna

    seed = int(cfg.seed)
    if cfg.sampler == "tpe":  # group: the conditional keys (µ only for FedProx) get their own model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if cfg.sampler == "gp":  # Gaussian process (scipy, torch); keys outside the space every
        return optuna.samplers.GPSampler(seed=seed)  # trial shares are sampled at random
    try:
        import cmaes  # noqa: F401
    except ImportError as e:
        raise TuningError("tuning.sampler=cmaes needs the 'cmaes' package") from e
    return optuna.samplers.CmaEsSampler(seed=seed)


def _pruner(cfg: DictConfig, rounds: int) -> Any:
    import optuna

    p = cfg.pruner
    warmup = int(cfg.warmup_rounds)
    if p == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(cfg.startup_trials), n_warmup_steps=warmup
        )
    if p == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, rounds))
    if p == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if p == "threshold":
        return optuna.pruners.ThresholdPruner(lower=float(cfg.prune_below), n_warmup_steps=warmup)
    return optuna.pruners.NopPruner()


# -- trials ---------------------------------------------------------------------------------------
class _Pruning:
    """The round hook of a trial: report each round's held-out mAP50-95, stop when pruned."""

    def __init__(self, trial: Any):
        self.trial = trial

    def on_round(self, record: dict) -> str | None:
        value = record.get("map50_95")
        if value is None or not math.isfinite(value):
            return None
        self.trial.report(float(value), step=int(record["round"]))
        return Status.PRUNED if self.trial.should_prune() else None


def _values(cfg: DictConfig, summary: Any) -> list[float]:
    from fl_server.run_dir import read_jsonl

    rounds = read_jsonl(summary.run_dir / "metrics.jsonl")
    out = []
    for objective in cfg.objectives:
        if objective in ("best_map", "final_map"):
            result = summary.best if objective == "best_map" else summary.final
            if result is None:
                raise RuntimeError(f"the federation reported no {objective}")
            out.append(float(result.map50_95))
        elif objective == "bytes":
            out.append(
                float(sum(c["bytes_up"] + c["bytes_down"] for r in rounds for c in r["clients"]))
            )
        else:
            out.append(
                float(sum(c.get("train_seconds", 0.0) for r in rounds for c in r["clients"]))
            )
    return out


def run_trial(st: Study, trial: Any) -> list[float]:
    """One federation with the trial's values; raises optuna.TrialPruned when pruned."""
    import optuna

    from fl_server import run

    values = suggest(trial, st.space)
    chosen = overrides(values)
    run_dir = st.trials_dir / f"{trial.number:04d}"
    trial.set_user_attr("overrides", chosen)
    trial.set_user_attr("run_dir", str(run_dir))
    hooks = [_Pruning(trial)] if len(st.cfg.objectives) == 1 and st.cfg.pruner != "none" else []
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


class _Claim:
    """One worker at a time counts the trials and asks for the next (journal on one host).

    Held from the count until the trial exists: the objective releases it as it starts.
    """

    def __init__(self, folder: Path):
        self.path = folder / ".ask.lock"
        self._f = None

    def acquire(self) -> None:
        self._f = self.path.open("w")
        fcntl.flock(self._f, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    def __enter__(self) -> _Claim:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def counted(trials: Sequence[Any]) -> list[Any]:
    """The trials that count towards ``tuning.trials``: every trial begun, except one that
    failed as stale (its worker died) and was re-run by Optuna's retry callback.

    A retry of a retry names the original in ``failed_trial``; the chain is its retry history
    (original, first retry, ...), so every trial in some trial's history was re-run."""
    from optuna.storages import RetryFailedTrialCallback
    from optuna.trial import TrialState

    retried = {n for t in trials for n in RetryFailedTrialCallback.retry_history(t)}
    return [
        t
        for t in trials
        if t.state != TrialState.WAITING
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
    import optuna

    study = st.optuna_study
    total = int(st.cfg.trials)
    deadline = None if st.cfg.timeout is None else time.monotonic() + float(st.cfg.timeout)
    claim = _Claim(st.folder)
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
    from optuna.trial import TrialState

    with _Claim(st.folder):
        running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        if not running:  # the last worker to finish reports the study
            report_study(st)


def return_freed_memory() -> None:
    """Hand the memory a trial freed back to the system (glibc's ``malloc_trim``).

    Measured (``benchmarks/tuning_memory.py``): without it a worker's RSS grew by 444 MB over 10
    trials before levelling off; with glibc told to trim, it stayed within 7 MB. Freed memory
    that glibc keeps in its arenas, not a leak. Elsewhere (musl, macOS) this does nothing.
    """
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Surplus(RuntimeError):
    """A trial beyond ``tuning.trials``: recorded FAIL without running (not counted)."""


def _objective(st: Study, trial: Any, claim: _Claim, total: int) -> Any:
    """One trial (Optuna records the outcome): values, ``TrialPruned``, or a failure with its
    reason kept as the trial's ``fail_reason``."""
    import optuna

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


# -- what a person reads --------------------------------------------------------------------------
def write_outputs(st: Study, plots: bool = False) -> None:
    from optuna.trial import TrialState

    study = st.optuna_study
    trials = study.get_trials(deepcopy=False)
    rows = [
        {
            "number": t.number,
            "state": t.state.name,
            "values": t.values,
            "params": t.params,
            "overrides": t.user_attrs.get("overrides"),
            "rounds": t.user_attrs.get("rounds"),
            "seconds": t.user_attrs.get("seconds"),
            "run_dir": t.user_attrs.get("run_dir"),
            "fail_reason": t.user_attrs.get("fail_reason"),
            "clearml_task": t.user_attrs.get("clearml_task"),
        }
        for t in trials
    ]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = _best(st, done)
    doc = {
        "study": study.study_name,
        "objectives": list(st.cfg.objectives),
        "directions": [d.name.lower() for d in study.directions],
        "base_overrides": st.base,
        "best": [
            {"number": t.number, "values": t.values, "overrides": t.user_attrs.get("overrides")}
            for t in best
        ],
        "trials": rows,
    }
    (st.folder / "study.json").write_text(json.dumps(doc, indent=1))
    if best:
        (st.folder / "best.yaml").write_text(
            yaml.safe_dump([*st.base, *best[0].user_attrs.get("overrides", [])])
        )
    (st.folder / "summary.md").write_text(_summary_md(st, rows, best))
    if plots and len(done) >= 2:
        _plots(st)


def _best(st: Study, done: list[Any]) -> list[Any]:
    if not done:
        return []
    if len(st.cfg.objectives) > 1:
        return list(st.optuna_study.best_trials)
    return [st.optuna_study.best_trial]


def _summary_md(st: Study, rows: list[dict], best: list[Any]) -> str:
    names = ", ".join(st.cfg.objectives)
    lines = [
        f"# Study {st.optuna_study.study_name}",
        "",
        f"Objectives: {names}. Trials: {len(rows)} of {st.cfg.trials}. Sampler "
        f"{st.cfg.sampler}, pruner {st.cfg.pruner}. Base: `{' '.join(st.base) or '(defaults)'}`.",
        "",
    ]
    if best:
        lines += [
            f"Best: trial {best[0].number}, {names} = {best[0].values}; run it again with",
            "",
            f"    fedyolo run --from {st.folder / 'best.yaml'}",
            "",
        ]
    lines += [
        "| trial | state | values | rounds | seconds | overrides |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        values = "" if r["values"] is None else ", ".join(f"{v:.4g}" for v in r["values"])
        ov = " ".join(r["overrides"] or []) or "(defaults)"
        note = f" ({r['fail_reason']})" if r["fail_reason"] else ""
        lines.append(
            f"| {r['number']} | {r['state']}{note} | {values} | {r['rounds'] or ''} | "
            f"{r['seconds'] or ''} | `{ov}` |"
        )
    return "\n".join(lines) + "\n"


def _plots(st: Study) -> None:
    """Optimization history and parameter importances (Pareto front when multi-objective)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    study = st.optuna_study
    plots = (
        {"pareto_front.png": ovm.plot_pareto_front}
        if len(st.cfg.objectives) > 1
        else {
            "optimization_history.png": ovm.plot_optimization_history,
            "param_importances.png": ovm.plot_param_importances,
        }
    )
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.savefig(st.folder / name, dpi=100, bbox_inches="tight")
            plt.close(fig)
        except Exception as e:  # noqa: BLE001 - a plot never costs the study
            LOGGER.warning("study plot %s not written: %s", name, e)


def report_study(st: Study) -> str | None:
    """One ClearML task for the study (type ``optimizer``, in the trials' project): each trial's
    values by trial number, the trials table with each federation's own task id, the best
    trial's parameters and values, and the plots. Same mode as the trials' tracking; offline, the
    session is in ``runs/<study>/clearml/`` for ``fedyolo clearml-import runs/<study>``. Never
    costs the study: an error is logged and the task id is None."""
    from fl_server import config as config_mod
    from fl_server import tracking
    from fl_server.run_dir import RunDir

    base = config_mod.compose(st.base)
    if not bool(base.tracking.enabled):
        return None
    doc = json.loads((st.folder / "study.json").read_text())
    here = RunDir(st.folder)  # sessions.json and the import use the same layout as a run's
    marker = st.folder / "clearml_task.json"  # the study's task, continued by a later run
    earlier = json.loads(marker.read_text()) if marker.is_file() else {}
    try:
        mode = tracking.resolve_mode(base.tracking, here)
        # online, a continued study reports into its task again; offline, ClearML cannot
        # continue a task, so the continuation is a new one naming the earlier one
        continued = earlier.get("task_id") if earlier.get("mode") == mode == "online" else False
        name = doc["study"]
        if earlier.get("task_id") and not continued:
            name += f" (continued from {earlier['task_id']})"
        task = tracking.open_task(
            here, mode, str(base.tracking.project), name, task_type="optimizer",
            continue_task=continued,
        )  # fmt: skip
        task.connect(OmegaConf.to_container(st.cfg, resolve=True), name="tuning")
        log = task.get_logger()
        for row in doc["trials"]:
            for name, value in zip(doc["objectives"], row["values"] or [], strict=False):
                log.report_scalar("trials", name, float(value), iteration=int(row["number"]))
        head = ["trial", "state", *doc["objectives"], "rounds", "seconds", "task", "overrides"]
        table = [head] + [
            [
                r["number"],
                r["state"],
                *(r["values"] or [""] * len(doc["objectives"])),
                r["rounds"] or "",
                r["seconds"] or "",
                r["clearml_task"] or "",
                " ".join(r["overrides"] or []),
            ]
            for r in doc["trials"]
        ]
        log.report_table("trials", "all", iteration=0, table_plot=table)
        if doc["best"]:
            best = doc["best"][0]
            task.connect({"overrides": best["overrides"], "trial": best["number"]}, name="best")
            for name, value in zip(doc["objectives"], best["values"], strict=False):
                log.report_single_value(f"best {name}", float(value))
        for png in sorted(st.folder.glob("*.png")):
            log.report_image("study", png.stem, iteration=0, local_path=str(png))
        tracking.close_task(here, task, mode)
        task_id = str(task.id)
        marker.write_text(json.dumps({"task_id": task_id, "mode": mode}))
        LOGGER.info("study %s: ClearML %s task %s", doc["study"], mode, task_id)
        return task_id
    except Exception as e:  # noqa: BLE001 - tracking never costs the study
        LOGGER.warning("ClearML study task not written: %s: %s", type(e).__name__, e)
        return None


def tune(overrides_: Sequence[str]) -> Study:
    """``fedyolo tune``: open (or continue) the study, run its trials, write its outputs."""
    st = open_study(overrides_)
    LOGGER.info("study %s in %s", st.optuna_study.study_name, st.folder)
    optimize(st)
    return st
