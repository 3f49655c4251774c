"""The Flower ServerApp: builds the global model, runs the strategy, evaluates every round.

The same ``serve()`` runs in both engines. In the deployment engine (``flwr run .``) the
module-level ``app`` reads the prepared run directory from the run config (``run-dir``); the
simulation engine gets an app bound to the run directory from ``server_app_for()``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import threading
import time
import traceback
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fl_client.evaluate import evaluate_checkpoint
from fl_client.model import (
    WEIGHTS_KEY,
    build_model,
    load_record,
    part_masks,
    record_digest,
    save_checkpoint,
    to_record,
)
from fl_client.train import resolve_device
from fl_client.transport import TransportSpec
from fl_client.wire import RoundConfig, TrainArgs
from fl_server import config as config_mod
from fl_server import hooks as hooks_mod
from fl_server.guard import Attribution, Decision, Guard, attribute, update_agreement
from fl_server.interrupts import StopFile
from fl_server.observed_grid import Interrupted, ObservedGrid
from fl_server.run_dir import METRIC_KEYS, RunDir, SummaryWriter, lost_rounds
from strategies import build_strategy

os.environ.setdefault("YOLO_OFFLINE", "1")

LOGGER = logging.getLogger("fedyolo")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = str(context.run_config.get("run-dir", ""))
    if not run_dir:
        raise ValueError("run config 'run-dir' is empty: start runs with `fedyolo run`")
    # the deployment engine (deploy/local.py) turns Ctrl-C/SIGTERM into this file
    serve(grid, Path(run_dir), StopFile(RunDir(Path(run_dir)).interrupt))


def server_app_for(run_dir: Path, interrupt: threading.Event | None = None) -> ServerApp:
    """A ServerApp bound to ``run_dir`` (the simulation engine takes app objects).

    ``interrupt``: set by the engine on Ctrl-C/SIGTERM; the run then ends ``interrupted``.
    """
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, run_dir, interrupt)

    return bound


def round_config(cfg, names: list[str], data_root: Path, arch: dict) -> RoundConfig:
    """What every client receives each round besides the weights (``fl_client.wire``).

    ``arch`` is the global model's architecture (``model.yaml``): clients build from it.
    """
    from strategies import describe

    strategy = describe(cfg)
    dp = (strategy["dp"] or {}).get("kind", "")
    return RoundConfig(
        train=TrainArgs.from_cfg(cfg.train),
        transport=TransportSpec(**cfg.transport),
        model_arch=json.dumps(arch, sort_keys=True),
        names=tuple(str(n) for n in names),
        data_root=str(data_root),
        seed=int(cfg.seed),
        threads=int(cfg.engine.get("client_cpus", cfg.engine.get("client_threads", 0))),
        drift_sample=int(cfg.drift.sample) if bool(cfg.drift.enabled) else 0,
        keep_local=tuple(strategy["local"]),
        dp_clipping=dp.removeprefix("client-") if dp.startswith("client-") else "",
    )


class Evaluator:
    """Evaluates a global model on the server's held-out set (``data/server_val``)."""

    def __init__(self, run: RunDir, cfg, model, server_val: Path):
        self.run, self.cfg, self.model, self.server_val = run, cfg, model, server_val

    def checkpoint(self, arrays: ArrayRecord, path: Path, server_round: int) -> Path:
        load_record(self.model, arrays)
        t = self.cfg.train
        return save_checkpoint(
            self.model,
            path,
            {"imgsz": int(t.imgsz), "data": str(self.server_val)},
            {"round": server_round, "run": self.run.path.name},
        )

    def __call__(self, arrays: ArrayRecord, path: Path, server_round: int) -> dict:
        """Metrics of ``arrays`` (written to ``path`` as an Ultralytics checkpoint first)."""
        self.checkpoint(arrays, path, server_round)
        t = self.cfg.train
        res = evaluate_checkpoint(
            path,
            self.server_val,
            imgsz=int(t.imgsz),
            batch=int(t.eval_batch),
            device=resolve_device(str(t.device)),
            workdir=self.run.work,
            keep_images=True,  # the guard's significance test (fl_server.guard.paired_drop)
        )
        res["weights_sha256"] = record_digest(arrays)
        return res


def _copy(arrays: ArrayRecord) -> ArrayRecord:
    """An independent copy (a strategy may keep and change the record it returned)."""
    return ArrayRecord({WEIGHTS_KEY: Array(arrays[WEIGHTS_KEY].numpy().copy())})


def _replace(src: Path, dst: Path) -> None:
    """Put ``src``'s content at ``dst`` atomically: a hard link (one copy on disk: checkpoints
    are only ever replaced, never written in place), a copy where links are not possible."""
    tmp = dst.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class Federation:
    """The round loop of one run: Flower's strategy API plus rollback, resume and tracking.

    Each round calls the strategy exactly as Flower's ``Strategy.start`` does
    (``configure_train`` → grid → ``aggregate_train`` → ``configure_evaluate`` → grid →
    ``aggregate_evaluate`` → server-side evaluation). Flower's loop has no place to reject a
    round's model, restore a strategy's state or start at round N, so fedyolo runs the same
    calls itself and adds, after the evaluation: the drift guard (``fl_server.guard``), the
    data-drift scores, the round's records, ClearML and the resumable state
    (``fl_server.state``).
    """

    def __init__(self, grid: Grid, run: RunDir):
        import json

        from fl_client import faults as faults_mod

        self.run = run
        self.cfg = cfg = config_mod.load(run.config)
        manifest = json.loads(run.manifest.read_text())
        self.names = manifest["data"]["names"]
        import torch

        torch.manual_seed(int(cfg.seed))  # the initial global model is a function of the seed
        self.model = build_model(str(cfg.model.cfg), self.names)
        masks = part_masks(self.model)
        self.strategy = build_strategy(cfg, run_dir=run, masks=masks)
        self.grid = ObservedGrid(
            grid,
            run,
            self.strategy.policy,
            params_mask=masks["params"],
            starve_timeout=float(cfg.federation.round_timeout),
        )
        self.evaluate = Evaluator(run, cfg, self.model, run.data / "server_val" / "data.yaml")
        self.guard = Guard(cfg.guard)
        self._cls_mask = masks["cls"] & masks["params"]  # guard.contribution's cls_agreement
        # policy exclude scores each reply on the held-out set: the grid keeps the round's updates
        self.grid.keep_updates = self.guard.enabled and (
            self.guard.policy == "exclude" or self.guard.contribution
        )
        self.drift = None  # per-client data drift (fl_server.data_drift)
        if bool(cfg.drift.enabled):
            from fl_server.data_drift import DriftMonitor

            self.drift = DriftMonitor(int(cfg.drift.reference_rounds), float(cfg.drift.threshold))
        self.faults = faults_mod.parse(cfg.faults, int(cfg.federation.clients))
        self.base_config = round_config(cfg, self.names, run.data, self.model.yaml)
        self.teacher_sha256 = None
        if OmegaConf.select(cfg, "distill.teacher") is not None:
            self._set_up_teacher(float(cfg.distill.weight))
        self.tracker = None  # fl_server.tracking.Tracker, from start_fresh/start_resumed
        self.hooks: list = []  # round hooks (fl_server.hooks), with the tracker
        self.round = 0  # last finished round
        self.arrays: ArrayRecord = to_record(self.model)
        self.best: tuple[ArrayRecord, dict] | None = None  # weights and strategy state
        self._skipped_warned: list[str] = []
        self.t_start = time.perf_counter()
        self.first_round = 1  # of this process (a resumed run starts later)
        self._contribution_seconds: dict[int, float] = {}  # guard.contribution, per round
        # the round a drop on probation began in, and its decision: a rollback that confirms
        # the drop searches that round's replies for culprits (its updates are kept till then)
        self._drop_began: tuple[int, Decision] | None = None

    def _set_up_teacher(self, weight: float) -> None:
        """Distillation: the teacher the run copied goes to each client once (the grid sends
        it); every round's config names it by sha256 (``fl_client.distill``)."""
        from fl_client import distill
        from fl_server.prepare import TEACHER

        teacher = distill.load_teacher(self.run.path / TEACHER, self.names, self.model)
        sha, records = distill.teacher_records(teacher)
        self.teacher_sha256 = sha
        self.base_config = dataclasses.replace(
            self.base_config, teacher_sha256=sha, distill_weight=weight
        )
        self.grid.teacher = records

    def _start_tracker(self, task_id: str | None = None) -> None:
        from fl_server.tracking import Tracker

        # off when tracking.enabled=false; without tracking when ClearML fails to start
        self.tracker = Tracker.start(self.cfg, self.run, resume_task_id=task_id)
        self._start_hooks()

        def forward(rnd: int, kind: str, details: dict) -> None:
            if kind != "tracker_error":  # the tracker's own trouble is not reported to itself
                self.tracker.report_event(rnd, kind, details)

        self.run.subscribe(forward)

    def _start_hooks(self) -> None:
        """The loop's round hooks (``fl_server.hooks``), in order: ClearML, the summary
        writer, the config's ``hooks``, and last the caller of ``fl_server.run`` (if waiting)."""
        builtin = [self.tracker]
        self.hooks = [*builtin, SummaryWriter(self.run, builtin)]
        paths = list(self.cfg.get("hooks") or [])
        try:
            self.hooks += hooks_mod.load_hooks(paths, self.run)
        except Exception as e:  # a user's hook that cannot start: the run fails, said so
            raise RunFailed(f"hooks={paths}: a hook could not start ({_one_line(e)})") from e
        bridge = hooks_mod.CallerBridge.if_requested(self.run.path)
        if bridge is not None:
            self.hooks.append(bridge)

    # -- set-up --------------------------------------------------------------------------------
    def start_fresh(self) -> None:
        cfg = self.cfg
        self._start_tracker()
        self.run.event(
            0,
            "run_start",
            engine=str(cfg.engine.name),
            strategy=str(cfg.strategy.name),
            transport=str(cfg.transport.scheme),
            clients=int(cfg.federation.clients),
            rounds=int(cfg.federation.rounds),
            faults=[f.__dict__ for f in self.faults] or None,
            tracker_task=self.tracker.task_id,
            distill_teacher_sha256=self.teacher_sha256,
        )
        res = self.evaluate(self.arrays, self.run.work / "candidate.pt", 0)
        self._save_matches(res, 0)
        metrics = {k: res[k] for k in METRIC_KEYS}
        self.run.event(0, "initial_eval", **metrics, weights_sha256=res["weights_sha256"])
        LOGGER.info("round 0 (initial model): mAP50-95 %.3f", res["map50_95"])
        self.guard.accept(0, res)
        self._promote(self.run.work / "candidate.pt", best=True)
        self.best = (_copy(self.arrays), self._strategy_state())
        self._save_state()

    def start_resumed(self) -> None:
        from fl_server import state as state_mod

        st = state_mod.load(self.run.state)
        self.round = int(st["round"])
        self.arrays = ArrayRecord({WEIGHTS_KEY: Array(st["weights"])})
        if st["strategy"] is not None:
            state_mod.restore_strategy(self.strategy, st["strategy"])
        best_w, best_strategy = st["best"]
        self.best = (ArrayRecord({WEIGHTS_KEY: Array(best_w)}), best_strategy)
        self.guard.load_state_dict(st["guard"])
        if self.guard.enabled and self.guard.significance is not None:
            # the reference's per-image matches are not in the state: evaluate it once again
            ref = self.best[0] if self.guard.reference == "best" else self.arrays
            res = self.evaluate(ref, self.run.work / "reference.pt", self.round)
            self.guard.images[self.guard.reference] = res.get("images")
        if self.drift is not None and st["drift"] is not None:
            self.drift.load_state_dict(st["drift"])
        kept = [r for r in self.run.rounds() if r["round"] <= self.round]
        dropped = len(self.run.rounds()) - len(kept)
        self.run.rewrite_rounds(kept)
        # best.pt and last.pt from the state (a kill may have come between their writes)
        self.evaluate.checkpoint(self.best[0], self.run.best, int(self.guard.state.best_round or 0))
        self.evaluate.checkpoint(self.arrays, self.run.last, self.round)
        self._start_tracker(st.get("tracker_task"))
        self.run.event(
            self.round,
            "resume",
            from_round=self.round + 1,
            rounds=int(self.cfg.federation.rounds),
            discarded_round_records=dropped,
            weights_sha256=record_digest(self.arrays),
            strategy_state=_restored_note(st),
            tracker_task=self.tracker.task_id,
        )
        LOGGER.info(
            "resuming %s after round %d (best %.3f at round %s)",
            self.run.path.name,
            self.round,
            self.guard.state.best_value or 0.0,
            self.guard.state.best_round,
        )

    def wait_for_clients(self, timeout: float) -> None:
        """Before the first round: wait until the whole fleet is connected (or ``timeout``)."""
        want = int(self.cfg.federation.clients)
        deadline = time.monotonic() + timeout
        while (have := len(list(self.grid.get_node_ids()))) < want:
            if time.monotonic() > deadline:
                LOGGER.warning("starting with %d of %d clients connected", have, want)
                self.run.event(self.round, "clients_missing", connected=have, expected=want)
                return
            time.sleep(1.0)

    # -- the loop --------------------------------------------------------------------------------
    def run_rounds(self) -> str:
        cfg = self.cfg
        total = int(cfg.federation.rounds)
        timeout = float(cfg.federation.round_timeout)
        for rnd in range(self.round + 1, total + 1):
            if self.grid.interrupt is not None and self.grid.interrupt.is_set():
                raise Interrupted("interrupted between rounds")
            t_round = time.perf_counter()
            self.grid.excluded = self.guard.excluded(rnd)
            if self.grid.excluded:
                self.run.event(rnd, "clients_excluded", clients=sorted(self.grid.excluded))
            random.seed(int(cfg.seed) * 100_003 + rnd)  # Flower samples with `random`
            train_cfg = self._train_config(rnd)
            replies = self.grid.send_and_receive(
                self.strategy.configure_train(rnd, self.arrays, train_cfg, self.grid),
                timeout=timeout,
            )
            aggregated, _ = self.strategy.aggregate_train(rnd, replies)
            candidate = self.arrays if aggregated is None else aggregated
            evaluate_cfg = ConfigRecord(dict(train_cfg))
            eval_replies = self.grid.send_and_receive(
                self.strategy.configure_evaluate(rnd, candidate, evaluate_cfg, self.grid),
                timeout=timeout,
            )
            self.strategy.aggregate_evaluate(rnd, eval_replies)
            t_eval = time.perf_counter()
            res = self.evaluate(candidate, self.run.work / "candidate.pt", rnd)
            eval_seconds = time.perf_counter() - t_eval
            self._save_matches(res, rnd)
            decision = self.guard.check(rnd, res, final=rnd == total)
            if decision.significant is False:
                self._noise_event(rnd, decision)
            if decision.probation:
                self._probation_event(rnd, decision)
            if self.guard.enabled and self.guard.contribution:
                self._contributions(rnd)  # also in a rolled-back round: evidence all the same
            if decision.rolled_back:
                self._rollback(rnd, res, decision)
            else:
                self.arrays = candidate
                improved = self.guard.accept(rnd, res, probation=decision.probation)
                self._promote(self.run.work / "candidate.pt", best=improved)
                if improved:
                    self.best = (_copy(candidate), self._strategy_state())
            record = self._record(
                rnd, res, decision, t_round, eval_seconds, float(train_cfg["lr0"])
            )
            self.round = rnd
            self._save_state()
            asked = self._call_hooks(rnd, record)
            if self.guard.should_stop():
                reason = (
                    f"{self.guard.state.consecutive} consecutive rollbacks "
                    f"(guard.stop_after={self.guard.stop_after}); the global model is the best "
                    f"checkpoint, round {self.guard.state.best_round}"
                )
                LOGGER.warning("stopping the run: %s", reason)
                self.run.event(rnd, "guard_stop", reason=reason)
                return "stopped"
            if asked is not None:
                LOGGER.info("round %d: a round hook asked to stop (%s)", rnd, asked)
                self.run.event(rnd, "hook_stop", status=asked)
                return asked
        return "completed"

    def _call_hooks(self, rnd: int, record: dict) -> str | None:
        """Every round hook on ``record`` (``fl_server.hooks.call_on_round``, one at a time so
        that a failing hook is named); the first stop status asked for."""
        asked = None
        for hook in self.hooks:
            try:
                got = hooks_mod.call_on_round([hook], record)
            except Exception as e:
                name = type(hook).__name__
                raise RunFailed(f"round hook {name} failed in round {rnd}: {_one_line(e)}") from e
            asked = asked or got
        return asked

    def _train_config(self, rnd: int) -> ConfigRecord:
        from fl_client import faults as faults_mod

        timeout = float(self.cfg.federation.round_timeout)
        return self.base_config.with_round(
            lr0=float(self.cfg.train.lr0) * self.guard.state.lr_scale,
            faults=faults_mod.for_round(self.faults, rnd, timeout),
        ).to_record()

    def _strategy_state(self) -> dict:
        from fl_server import state as state_mod

        return state_mod.strategy_state(self.strategy)

    def _promote(self, candidate: Path, best: bool) -> None:
        """The accepted model becomes ``last.pt`` (and ``best.pt`` when it is the best)."""
        if best:
            _replace(candidate, self.run.best)
        os.replace(candidate, self.run.last)

    def _rollback(self, rnd: int, res: dict, decision) -> None:
        from fl_server import state as state_mod

        held = self.guard.state.probation  # rounds on probation before this one
        searched, scored = rnd, decision
        if held and self._drop_began and self.grid.rounds.get(self._drop_began[0]):
            # the drop began on probation: the replies that caused it are that round's (this
            # round's clients all trained from the dropped model)
            searched, scored = self._drop_began
        log = self.grid.rounds.get(searched)
        attribution = None
        if self.guard.policy == "exclude" and log and log.updates:
            attribution = self._attribute(log, scored, searched)
        culprits = attribution.culprits if attribution else []
        best_arrays, best_strategy = self.best
        self.arrays = best_arrays
        if best_strategy is not None:  # None: a resumed run whose strategy state was not saved
            state_mod.restore_strategy(self.strategy, best_strategy)
        _replace(self.run.best, self.run.last)  # the global model is the best one again
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
            "rollback",
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

    def _warn(self, rnd: int, kind: str, reason: str, **fields) -> None:
        """A guard event worth a warning: logged, and in events.jsonl with its evidence."""
        LOGGER.warning("round %d: %s", rnd, reason)
        self.run.event(rnd, kind, reason=reason, **fields)

    def _probation_event(self, rnd: int, decision) -> None:
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
            "drop_on_probation",
            reason=reason,
            **decision.evidence(),
            drop_ci=ci,
        )

    def _noise_event(self, rnd: int, decision) -> None:
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
        self.run.event(rnd, "drop_within_noise", reason=reason, drop_ci=ci)

    def _save_matches(self, res: dict, rnd: int, model: str = "") -> None:
        """``output.save_matches``: keep an evaluation's per-image matches in
        ``eval/round_NNNN[_model].npz`` (``fl_server.guard.save_images``), so the guard's rules
        can be replayed on the finished run."""
        if self.cfg.output.get("save_matches") and res.get("images"):
            from fl_server.guard import save_images

            suffix = f"_{model}" if model else ""
            save_images(self.run.path / "eval" / f"round_{rnd:04d}{suffix}.npz", res["images"])

    def _mean_without(self, log, excluded: frozenset[str]) -> ArrayRecord:
        """The example-weighted mean of the round's returned models, without ``excluded``:
        FedAvg's rule, used for every strategy as the measure of what a client moved."""
        weights = {str(e["id"]): max(1, int(e["num_examples"])) for e in log.clients}
        keep = [k for k in sorted(log.updates) if k in weights and k not in excluded]
        total = float(sum(weights[k] for k in keep))
        mean = sum((weights[k] / total) * log.updates[k].astype(np.float64) for k in keep)
        return ArrayRecord({WEIGHTS_KEY: Array(np.asarray(mean, dtype=np.float32))})

    def _contributions(self, rnd: int) -> None:
        """``guard.contribution``: what each client did to this round's aggregate, on the
        held-out set (``fl_server.guard.Guard.contributions``): the mean of every reply and the
        mean without client k are evaluated; k is flagged when, over its last two
        participations, the aggregate would have been significantly better without it (paired
        bootstrap), and this round it did not help and did less than the other clients. Each
        client's entry in ``metrics.jsonl`` gets its ``loo_gain``, ``loo_gain_2`` (two
        participations), their intervals and ``loo_vs_others``; a flag is a
        ``client_flagged`` event with the evidence, and under ``guard.policy=exclude`` the
        client sits out ``guard.exclude_rounds`` rounds."""
        log = self.grid.rounds.get(rnd)
        if log is None or len(log.updates) < 3:
            return
        t0 = time.perf_counter()
        path = self.run.work / "client_update.pt"
        everyone = self.evaluate(self._mean_without(log, frozenset()), path, rnd)
        without = {
            k: self.evaluate(self._mean_without(log, frozenset({k})), path, rnd)
            for k in sorted(log.updates)
        }
        path.unlink(missing_ok=True)
        self._save_matches(everyone, rnd, "all")
        for k, res in without.items():
            self._save_matches(res, rnd, f"without_{k}")
        base = self.arrays[WEIGHTS_KEY].numpy().reshape(-1)  # the model this round was sent
        agreement = update_agreement(base, log.updates, self._cls_mask)
        scores = self.guard.contributions(rnd, everyone, without, agreement)
        seconds = time.perf_counter() - t0
        self._contribution_seconds[rnd] = seconds
        for entry in log.clients:
            sc = scores.get(str(entry["id"]))
            if sc is not None:
                entry["loo_gain"] = sc["gain"]
                entry["loo_ci"] = sc["ci"]
                entry["loo_gain_2"] = sc["gain_2"]
                entry["loo_ci_2"] = sc["ci_2"]
                entry["loo_vs_others"] = sc["vs_others"]
                entry["cls_agreement"] = agreement.get(str(entry["id"]))
        for k, sc in scores.items():
            if not sc["flagged"]:
                continue
            m, ci2 = self.guard.metric, sc["ci_2"]
            reason = (
                f"client {k}: leaving its update out would have raised the aggregate's {m} by "
                f"{sc['gain_2']:+.4f} over rounds {ci2['rounds'][0]} and {ci2['rounds'][1]} "
                f"({ci2['level']:.0%} lower bound {ci2['low']:+.4f} > 0; this round "
                f"{everyone[m]:.4f} with it, {without[k][m]:.4f} without: it did not help, and "
                f"less than the other clients) (guard.contribution)"
            )
            self._warn(
                rnd,
                "client_flagged",
                client=k,
                reason=reason,
                scores={c: v["gain"] for c, v in scores.items()},
                evidence=sc,
                excluded_until_round=self.guard.flag(rnd, k),
                seconds=seconds,
            )
        LOGGER.info("round %d: contributions of %d clients in %.1f s", rnd, len(scores), seconds)

    def _attribute(self, log, decision, rnd: int) -> Attribution:
        """Leave-one-out over the round's replies (``fl_server.guard.attribute``).

        The aggregate without a client is the example-weighted mean of the others' returned
        models: FedAvg's rule, used for every strategy as the measure of what a client moved.
        """
        ids = [k for k in sorted(log.updates) if k in {str(e["id"]) for e in log.clients}]
        path = self.run.work / "client_update.pt"

        def score_without(excluded: frozenset[str]) -> float:
            record = self._mean_without(log, excluded)
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

    def _record(
        self, rnd: int, res: dict, decision, t_round: float, eval_seconds: float, lr0: float
    ) -> dict:
        log = self.grid.rounds.get(rnd)
        clients = log.clients if log else []
        self._score_data_drift(rnd, clients, log.data_stats if log else {})
        now = time.perf_counter()
        record = {
            "round": rnd,
            **{k: res[k] for k in METRIC_KEYS},
            "per_class": res["per_class"],
            "round_seconds": now - t_round,
            "eval_seconds": eval_seconds,
            "contribution_seconds": self._contribution_seconds.pop(rnd, None),
            "transport_seconds": log.transport_seconds if log else 0.0,
            "clients": clients,
            "failures": log.failed if log else 0,
            "weights_sha256": res["weights_sha256"],
            "global_sha256": (
                record_digest(self.arrays) if decision.rolled_back else res["weights_sha256"]
            ),
            "guard": decision.as_dict(),
            "lr0": lr0,  # the clients' learning rate this round (guard.policy=lower_lr)
        }
        if log and log.client_eval:  # federation.fraction_evaluate > 0: clients' own val splits
            record["client_eval"] = log.client_eval
        if not clients:
            self.run.event(
                rnd, "round_failed", reason="no usable client update; the global model is unchanged"
            )
        self.run.add_round(record)
        if decision.probation and self._drop_began is None:
            self._drop_began = (rnd, decision)  # its updates are kept for a culprit search
        else:
            if not decision.probation:
                self._drop_began = None
            kept = {self._drop_began[0]} if self._drop_began else set()
            for r in [r for r in self.grid.rounds if r <= rnd and r not in kept]:
                self.grid.rounds.pop(r)  # frees kept updates
        total = int(self.cfg.federation.rounds)
        left = (now - self.t_start) / max(1, rnd - self.first_round + 1) * (total - rnd)
        LOGGER.info(
            "round %d/%d | mAP50-95 %.3f mAP50 %.3f | %s | best %.3f (round %s) | %.1f s "
            "| ~%.0f s left",
            rnd,
            total,
            res["map50_95"],
            res["map50"],
            "ROLLED BACK" if decision.rolled_back else "accepted",
            self.guard.state.best_value or 0.0,
            self.guard.state.best_round,
            record["round_seconds"],
            left,
        )
        return record

    def _score_data_drift(self, rnd: int, clients: list[dict], stats: dict[str, dict]) -> None:
        """Add each client's data-drift score to its entry; record a drift event when high."""
        if self.drift is None:
            return
        from fl_client.data_stats import from_metrics

        for entry in clients:
            s = from_metrics(stats.get(str(entry["id"]), {}))
            if s is None:
                continue
            score = self.drift.score(str(entry["id"]), rnd, s)
            entry["drift_score"] = score["drift_score"]
            entry["drift_features"] = score["drift_features"]
            if score["drifted"]:
                top = max(score["drift_features"], key=score["drift_features"].get)
                self.run.event(
                    rnd,
                    "data_drift",
                    client=entry["id"],
                    score=score["drift_score"],
                    features=score["drift_features"],
                    reason=(
                        f"client {entry['id']}'s data moved from its first rounds: score "
                        f"{score['drift_score']:.2f} (most: {top}), above drift.threshold="
                        f"{self.drift.threshold}"
                    ),
                )

    def _save_state(self) -> None:
        from fl_server import state as state_mod

        best_w, best_strategy = self.best
        state = {
            "round": self.round,
            "weights": self.arrays[WEIGHTS_KEY].numpy().reshape(-1),
            "strategy": vars(state_mod.inner(self.strategy)),  # encoded as it is, not copied
            "strategy_note": None,
            "best": (best_w[WEIGHTS_KEY].numpy().reshape(-1), best_strategy),
            "guard": self.guard.state_dict(),
            "drift": self.drift.state_dict() if self.drift is not None else None,
            "tracker_task": self.tracker.task_id if self.tracker else None,
        }
        try:
            skipped = state_mod.save(self.run.state, state)
        except Exception as e:  # noqa: BLE001 - e.g. a plug-in strategy state JSON cannot hold
            LOGGER.warning("the strategy's state cannot be saved for resume: %s", e)
            note = f"not saved ({type(e).__name__}: {e}); the strategy restarted fresh"
            state.update(strategy=None, strategy_note=note, best=(state["best"][0], None))
            skipped = state_mod.save(self.run.state, state)
        if skipped and skipped != self._skipped_warned:
            self._skipped_warned = skipped
            LOGGER.warning("strategy state left out of the resumable state: %s", skipped)

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, status: str, reason: str | None = None) -> None:
        run = self.run
        if not self.hooks:  # the run failed before its hooks started: still write its summary
            self.hooks = [SummaryWriter(run, [])]
        task = self.tracker.task_id if self.tracker is not None else None
        try:
            summary = run.write_summary(
                run.rounds(), status=status, clearml_task=task, reason=reason
            )
        except OSError as e:  # e.g. a full disk: the caller finds summary.json unfinished
            LOGGER.error("could not write %s: %s", run.summary, _one_line(e))
            return
        try:
            run.write_plot(run.rounds())
        except Exception as e:  # noqa: BLE001 - a plot must never hide the run's outcome
            LOGGER.error("could not write %s: %s", run.plot, _one_line(e))
        for hook in self.hooks:
            try:
                hooks_mod.call_on_end([hook], summary)
            except Exception as e:  # noqa: BLE001 - one hook's failure must not cost the others
                name = type(hook).__name__
                LOGGER.error("round hook %s failed at the end of the run: %s", name, _one_line(e))
        try:
            run.event(self.round, "run_end", status=status)  # last write: the run is complete
        except OSError as e:
            LOGGER.error("could not write %s: %s", run.events, _one_line(e))


def _restored_note(st: dict) -> str:
    """The ``resume`` event's word on the strategy's state."""
    if st["strategy"] is None:
        return str(st["strategy_note"])
    skipped = st.get("skipped") or []
    return "restored" if not skipped else f"restored except {', '.join(skipped)} (not data)"


class RunFailed(RuntimeError):
    """The run cannot go on, for a reason a user can act on (named in one line)."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, RunFailed) else f"{type(e).__name__}: {text}"


def _failed(run: RunDir, rnd: int, e: Exception) -> str:
    """Record why the run failed (the traceback in ``events.jsonl``, for a bug); the reason."""
    reason = _one_line(e)
    LOGGER.error("the run failed after round %d: %s", rnd, reason)
    try:
        run.event(rnd, "run_failed", reason=reason, traceback=traceback.format_exc())
    except Exception as err:  # noqa: BLE001 - e.g. the full disk that failed the run
        LOGGER.error("could not record the failure in %s: %s", run.events, _one_line(err))
    return reason


def _outcome(run: RunDir, status: str) -> tuple[str, str | None]:
    """A run whose every round aggregated nothing did not train: it failed, with the reason."""
    rounds = run.rounds()
    lost = lost_rounds(rounds)
    if status == "interrupted" or not rounds or len(lost) < len(rounds):
        return status, None
    reason = (
        f"no round aggregated a client update: every client failed or was rejected in all "
        f"{len(rounds)} round(s); see {run.events}"
    )
    LOGGER.error("the run failed: %s", reason)
    return "failed", reason


def serve(grid: Grid, run_path: Path, interrupt: threading.Event | StopFile | None = None) -> None:
    """Run (or resume) the whole federation for the prepared run directory ``run_path``.

    An ``interrupt`` (Ctrl-C/SIGTERM, set by the engine) abandons the round in progress and
    ends the run ``interrupted``: the state of the last finished round stays, ready to resume.
    A failure ends the run ``failed`` with its reason in ``summary.json`` (and the traceback in
    ``events.jsonl``): the engine's caller reads the summary, it does not get the exception.
    """
    run = RunDir(run_path)
    try:
        fed = Federation(grid, run)
    except Exception as e:  # noqa: BLE001 - said in summary.json, in one line
        run.write_summary(run.rounds(), status="failed", reason=_failed(run, 0, e))
        return
    fed.grid.interrupt = interrupt
    status, reason = "failed", None
    try:
        if fed.cfg.resume is not None and run.state.exists():
            fed.start_resumed()
        else:
            fed.start_fresh()
        fed.first_round = fed.round + 1
        fed.wait_for_clients(float(fed.cfg.engine.get("startup_timeout", 120)))
        status = fed.run_rounds()
        status, reason = _outcome(run, status)
    except Interrupted:
        LOGGER.warning("interrupted: the run stops after round %d; resume=%s", fed.round, run.path)
        status = "interrupted"
    except Exception as e:  # noqa: BLE001 - said in summary.json, in one line
        reason = _failed(run, fed.round, e)
    finally:
        fed.finish(status, reason)
    if status == "completed":
        LOGGER.info("run finished: %s", run.summary)
