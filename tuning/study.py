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
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from fl_client.lazy import lazy
from fl_server import config as config_mod
from tuning.space import Param, TuningError, defaults, load_space, overrides

optuna = lazy("optuna")

LOGGER = logging.getLogger("fedyolo")

SAMPLERS = ("tpe", "random", "gp", "cmaes", "nsga2")
PRUNERS = ("median", "hyperband", "successive_halving", "threshold", "none")
PRUNE_ON = ("auto", "map", "loss", "map+loss")
# objective -> (direction, what it reads from a finished federation)
OBJECTIVES = {
    "best_map": "maximize",
    "final_map": "maximize",
    "bytes": "minimize",
    "client_seconds": "minimize",
}


def tuning_config(overrides_: Sequence[str]) -> tuple[DictConfig, list[str]]:
    """``configs/tuning/default.yaml`` with the ``tuning.*`` overrides, composed as a run's config
    is (``fl_server.config.compose_settings``: one override grammar); the rest is the base."""
    mine = [o.removeprefix("tuning.") for o in overrides_ if o.startswith("tuning.")]
    base = [o for o in overrides_ if not o.startswith("tuning.")]
    cfg = config_mod.compose_settings("tuning/default", mine, "tuning", TuningError)
    _check(cfg)
    if cfg.pruner != "none" and not any(o.startswith("federation.overlap_eval=") for o in base):
        # a trial pruned after round r would already be training round r+1 on the clients (the
        # overlapped evaluation): that round is discarded but its client seconds are spent, ~10
        # points of the savings on the pruning benchmark's replays. Pruned studies run rounds one
        # after the other unless told otherwise.
        base = [*base, "federation.overlap_eval=false"]
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
    if cfg.prune_on not in PRUNE_ON:
        raise bad("prune_on", f"one of {list(PRUNE_ON)}")
    if cfg.pruner == "threshold" and cfg.prune_on not in ("auto", "map"):
        raise bad("prune_on", "map with tuning.pruner=threshold (tuning.prune_below is an mAP)")
    if cfg.prune_on == "auto":  # threshold: its bound is an mAP; the rank-based pruners: map+loss
        cfg.prune_on = "map" if cfg.pruner == "threshold" else "map+loss"
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
    with Claim(folder):  # workers starting together create the study and trial 0 once
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
    if cfg.storage:
        return optuna.storages.RDBStorage(
            str(cfg.storage),
            heartbeat_interval=int(cfg.heartbeat_interval),
            grace_period=int(cfg.grace_period),
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(
                max_retry=int(cfg.max_retry)
            ),
        )
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "study.journal"))
    )


def _sampler(cfg: DictConfig) -> Any:
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
    p = cfg.pruner
    warmup = int(cfg.warmup_rounds)
    if p == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(cfg.startup_trials), n_warmup_steps=warmup
        )
    if p == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, rounds))
    if p == "successive_halving":  # one rung at a third of the rounds keeps the top quarter
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, rounds // 3))
    if p == "threshold":
        return optuna.pruners.ThresholdPruner(lower=float(cfg.prune_below), n_warmup_steps=warmup)
    return optuna.pruners.NopPruner()


class Claim:
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

    def __enter__(self) -> Claim:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
