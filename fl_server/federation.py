"""The round loop of one run, read top to bottom like Flower's ``Strategy.start``.

Each round calls the strategy exactly as Flower's loop does (``configure_train`` → grid →
``aggregate_train`` → ``configure_evaluate`` → grid → ``aggregate_evaluate`` → server-side
evaluation). Flower's loop has no place to reject a round's model, restore a strategy's state or
start at round N, so fedyolo runs the same calls itself and adds, after the evaluation, one call
to the drift guard's step (``fl_server.guard.step``), then the round's record (data-drift scores
included), the resumable state (``fl_server.state``) and the round hooks (ClearML, the summary
writer, the config's and the caller's: ``fl_server.reporting``, which also ends the run).
``fl_server.server_app`` wires it into Flower's ServerApp.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import shutil
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from omegaconf import OmegaConf

from fl_client import distill
from fl_client import faults as faults_mod
from fl_client.data_stats import from_metrics
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
from fl_server import lr_schedule
from fl_server import state as state_mod
from fl_server.data_drift import DriftMonitor
from fl_server.downlink import Downlink
from fl_server.guard import Guard, GuardState
from fl_server.guard.step import GuardStep, Verdict
from fl_server.observed_grid import Interrupted, ObservedGrid, RoundLog
from fl_server.prepare import TEACHER
from fl_server.records import ClientEntry, EventKind, RoundRecord, Status, round_record
from fl_server.reporting import Reporting
from fl_server.run_dir import METRIC_KEYS, RunDir
from fl_server.sampling import Sampler
from strategies import build_strategy, describe

LOGGER = logging.getLogger("fedyolo")


def round_config(cfg, names: list[str], data_root: Path, arch: dict) -> RoundConfig:
    """What every client receives each round besides the weights (``fl_client.wire``).

    ``arch`` is the global model's architecture (``model.yaml``): clients build from it.
    """
    strategy = describe(cfg)
    dp = (strategy["dp"] or {}).get("kind", "")
    return RoundConfig(
        train=TrainArgs.from_cfg(cfg.train),
        transport=TransportSpec(**{k: v for k, v in cfg.transport.items() if k != "down"}),
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


@dataclass
class Speculation:
    """Round ``rnd``'s training, begun on ``sent`` (the previous round's candidate) while the
    server evaluated it (``federation.overlap_eval``)."""

    rnd: int
    sent: ArrayRecord
    excluded: set[str]
    train_cfg: dict[str, Any]
    replies: list
    sampling: dict | None  # the sampler's state before this round sampled
    seconds: float  # its exchange's wall time

    def invalid(
        self, arrays: ArrayRecord, excluded: set[str], train_cfg: ConfigRecord
    ) -> str | None:
        """Why these replies are not what round ``rnd`` would have got had it started after
        the guard's word (None: they are): the global model, the clients left out and the
        round's config must be the ones it began with."""
        if arrays is not self.sent:
            return f"the guard did not keep round {self.rnd - 1}'s model"
        if excluded != self.excluded:
            return (
                f"the guard changed the clients left out of round {self.rnd} "
                f"({sorted(self.excluded)} -> {sorted(excluded)})"
            )
        changed = sorted(
            k for k in {*train_cfg, *self.train_cfg} if train_cfg.get(k) != self.train_cfg.get(k)
        )
        if changed:
            return f"round {self.rnd}'s config changed ({', '.join(changed)})"
        return None


class Federation:
    """One run: its model, strategy, grid and guard, set up fresh or resumed, and its rounds."""

    def __init__(self, grid: Grid, run: RunDir):
        self.run = run
        self.cfg = cfg = config_mod.load(run.config)
        manifest = json.loads(run.manifest.read_text())
        self.names = manifest["data"]["names"]
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
            downlink=(
                Downlink(int(cfg.transport.block))
                if cfg.transport.get("down", "fp32") == "q4z"
                else None
            ),
        )
        if str(cfg.federation.sampling) != "uniform":
            self.grid.sampler = Sampler(
                str(cfg.federation.sampling), int(cfg.federation.max_skip), int(cfg.seed)
            )
        self.evaluate = Evaluator(run, cfg, self.model, run.server_val_yaml)
        # federation.overlap_eval; never with differential privacy: a discarded round's
        # clients would have spent privacy budget on updates nobody uses
        self.overlap = bool(cfg.federation.overlap_eval) and not describe(cfg)["dp"]
        self.guard = Guard(cfg.guard)
        self.guard_step = GuardStep(
            run,
            self.guard,
            self.evaluate,
            cls_mask=masks["cls"] & masks["params"],  # guard.contribution's cls_agreement
            save_matches=bool(cfg.output.get("save_matches")),
            restore_best=self._restore_best,
            bn_pooled=getattr(self.strategy, "bn_pooled", None),
        )
        self.grid.keep_updates = self.guard_step.needs_updates
        self.drift = None  # per-client data drift (fl_server.data_drift)
        if bool(cfg.drift.enabled):
            self.drift = DriftMonitor(int(cfg.drift.reference_rounds), float(cfg.drift.threshold))
        self.faults = faults_mod.parse(cfg.faults, int(cfg.federation.clients))
        self.base_config = round_config(cfg, self.names, run.data, self.model.yaml)
        self.teacher_sha256 = None
        if OmegaConf.select(cfg, "distill.teacher") is not None:
            self._set_up_teacher(float(cfg.distill.weight))
        self.reports = Reporting(run)  # ClearML and the round hooks, from start_fresh/_resumed
        self.round = 0  # last finished round
        self.arrays: ArrayRecord = to_record(self.model)
        self.best: tuple[ArrayRecord, dict] | None = None  # weights and strategy state
        self._skipped_warned: list[str] = []
        self.t_start = time.perf_counter()
        self._process = psutil.Process()  # the server's own memory, in each round's record
        self.first_round = 1  # of this process (a resumed run starts later)

    def _set_up_teacher(self, weight: float) -> None:
        """Distillation: the teacher the run copied goes to each client once (the grid sends
        it); every round's config names it by sha256 (``fl_client.distill``)."""
        teacher = distill.load_teacher(self.run.path / TEACHER, self.names, self.model)
        sha, records = distill.teacher_records(teacher)
        self.teacher_sha256 = sha
        self.base_config = dataclasses.replace(
            self.base_config, teacher_sha256=sha, distill_weight=weight
        )
        self.grid.teacher = records

    # -- set-up --------------------------------------------------------------------------------
    def start_fresh(self) -> None:
        cfg = self.cfg
        self.reports.start(self.cfg)
        self.run.event(
            0,
            EventKind.RUN_START,
            engine=str(cfg.engine.name),
            strategy=str(cfg.strategy.name),
            transport=str(cfg.transport.scheme),
            clients=int(cfg.federation.clients),
            rounds=int(cfg.federation.rounds),
            faults=[f.__dict__ for f in self.faults] or None,
            tracker_task=self.reports.task_id,
            distill_teacher_sha256=self.teacher_sha256,
            overlap_eval=self.overlap,
        )
        res = self.evaluate(self.arrays, self.run.candidate, 0)
        self.guard_step.save_matches(res, 0)
        metrics = {k: res[k] for k in METRIC_KEYS}
        self.run.event(0, EventKind.INITIAL_EVAL, **metrics, weights_sha256=res["weights_sha256"])
        LOGGER.info("round 0 (initial model): mAP50-95 %.3f", res["map50_95"])
        self.guard.accept(0, res)
        self._promote(self.run.candidate, best=True)
        self.best = (_copy(self.arrays), self._strategy_state())
        self._save_state()

    def start_resumed(self, torn: dict[str, int] | None = None) -> None:
        """``torn``: the bytes of the lines a kill cut short, removed per file (``serve``)."""
        st = state_mod.load(self.run.state)
        self.round = int(st["round"])
        self.arrays = ArrayRecord({WEIGHTS_KEY: Array(st["weights"])})
        if st["strategy"] is not None:
            state_mod.restore_strategy(self.strategy, st["strategy"])
        best_w, best_strategy = st["best"]
        self.best = (ArrayRecord({WEIGHTS_KEY: Array(best_w)}), best_strategy)
        self.guard.load_state_dict(st["guard"])
        self.guard_step.reload_reference(self.best[0], self.arrays, self.round)
        if self.drift is not None and st["drift"] is not None:
            self.drift.load_state_dict(st["drift"])
        if self.grid.sampler is not None:
            self.grid.sampler.load_state_dict(st.get("sampling"))
        kept = [r for r in self.run.rounds() if r["round"] <= self.round]
        dropped = len(self.run.rounds()) - len(kept)
        self.run.rewrite_rounds(kept)
        # best.pt and last.pt from the state (a kill may have come between their writes)
        self.evaluate.checkpoint(self.best[0], self.run.best, int(self.guard.state.best_round or 0))
        self.evaluate.checkpoint(self.arrays, self.run.last, self.round)
        self.reports.start(self.cfg, st.get("tracker_task"))
        self.run.event(
            self.round,
            EventKind.RESUME,
            from_round=self.round + 1,
            rounds=int(self.cfg.federation.rounds),
            discarded_round_records=dropped,
            weights_sha256=record_digest(self.arrays),
            strategy_state=_restored_note(st),
            tracker_task=self.reports.task_id,
            **({"torn_lines_removed": torn} if torn else {}),
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
                self.run.event(self.round, EventKind.CLIENTS_MISSING, connected=have, expected=want)
                return
            time.sleep(1.0)

    # -- the loop --------------------------------------------------------------------------------
    def run_rounds(self) -> Status:
        """Every round left, in order; the status the run ends with.

        With ``federation.overlap_eval`` the server's evaluation of round r's model runs in a
        thread while round r+1's clients already train on it (``Speculation``): when the guard
        accepts the model (the common case) round r+1 goes on with those replies, exactly as if
        it had started after the guard's word; otherwise they are discarded, recorded as a
        ``round_discarded`` event, and round r+1 runs again from the model the guard left."""
        total = int(self.cfg.federation.rounds)
        timeout = float(self.cfg.federation.round_timeout)
        spec: Speculation | None = None
        t_last = time.perf_counter()  # the previous round's record (a round's time starts there)
        for rnd in range(self.round + 1, total + 1):
            self._check_interrupt()

            # --- TRAINING (CLIENTAPP-SIDE), perhaps begun during the last round's evaluation ---
            excluded = self.guard_step.excluded(rnd)
            train_cfg = self._train_config(rnd)
            why = None if spec is None else spec.invalid(self.arrays, excluded, train_cfg)
            if spec is not None and why is None:
                train_replies = spec.replies
            else:
                if spec is not None:
                    self._discard(spec, str(why))
                self.grid.excluded = excluded
                train_replies = self.grid.send_and_receive(
                    self._configure_train(rnd, self.arrays, train_cfg), timeout=timeout
                )
            spec = None

            # --- AGGREGATION ---
            t_aggregate = time.perf_counter()
            aggregated, _ = self.strategy.aggregate_train(rnd, train_replies)
            aggregate_seconds = time.perf_counter() - t_aggregate
            candidate = self.arrays if aggregated is None else aggregated

            # --- EVALUATION (CLIENTAPP-SIDE) ---
            evaluate_replies = self.grid.send_and_receive(
                self.strategy.configure_evaluate(
                    rnd, candidate, ConfigRecord(dict(train_cfg)), self.grid
                ),
                timeout=timeout,
            )
            self.strategy.aggregate_evaluate(rnd, evaluate_replies)

            # --- EVALUATION (SERVERAPP-SIDE), with the next round's training when overlapped ---
            if self.overlap and rnd < total:
                res, eval_seconds, spec = self._evaluate_overlapped(rnd, candidate, timeout)
            else:
                t_eval = time.perf_counter()
                res = self.evaluate(candidate, self.run.candidate, rnd)
                eval_seconds = time.perf_counter() - t_eval
            log = self.grid.rounds.get(rnd)  # what the grid saw this round

            # --- GUARD STEP: accept (perhaps on probation) or roll back to the best model ---
            verdict = self.guard_step(rnd, res, self.grid.rounds, self.arrays, rnd == total)
            if not verdict.decision.rolled_back:
                self._adopt(candidate, verdict.improved)
            elif self.grid.downlink is not None:  # a step back is large: the model goes whole
                self.grid.downlink.reset()

            # --- RECORD AND CHECKPOINT ---
            lr0 = float(train_cfg["lr0"])
            record = self._record(
                rnd, res, verdict, log, t_last, eval_seconds, aggregate_seconds, lr0
            )
            t_last = time.perf_counter()
            self.round = rnd
            self._save_state(spec)

            # --- HOOKS, THEN WHETHER TO GO ON ---
            asked = self.reports.on_round(rnd, record)
            stop = self.guard_step.should_stop(rnd)
            if (stop or asked is not None) and spec is not None:
                self._discard(spec, f"the run stopped after round {rnd}")
            if stop:
                return Status.STOPPED
            if asked is not None:
                LOGGER.info("round %d: a round hook asked to stop (%s)", rnd, asked)
                self.run.event(rnd, EventKind.HOOK_STOP, status=asked)
                return Status(asked)
        return Status.COMPLETED

    def _configure_train(self, rnd: int, arrays: ArrayRecord, train_cfg: ConfigRecord) -> list:
        """The strategy's train messages of round ``rnd`` (Flower samples with ``random``)."""
        random.seed(int(self.cfg.seed) * 100_003 + rnd)
        return list(self.strategy.configure_train(rnd, arrays, train_cfg, self.grid))

    def _evaluate_overlapped(
        self, rnd: int, candidate: ArrayRecord, timeout: float
    ) -> tuple[dict, float, Speculation | None]:
        """Round ``rnd``'s server evaluation of ``candidate`` in a thread while round
        ``rnd + 1``'s clients train on it; the evaluation, its seconds and the speculation
        (None when Ctrl-C/SIGTERM came meanwhile, or the exchange failed: round ``rnd`` ends
        either way, then the run, or round ``rnd + 1`` as a round of its own).

        The next round is configured as the guard stands now (its exclusions, its lr0) and
        sampled before the thread starts, so the evaluation cannot touch ``random`` between
        the seed and Flower's sample. Only the evaluation runs in the thread: it uses the
        server's model and ``candidate.pt``, which nothing else touches meanwhile."""
        nxt = rnd + 1
        excluded = self.guard.excluded(nxt)  # as it stands: the guard step may change it
        train_cfg = self._train_config(nxt)
        sampler = self.grid.sampler
        sampling = copy.deepcopy(sampler.state_dict()) if sampler is not None else None
        self.grid.excluded = excluded
        asked = dict(train_cfg)  # before the strategy adds its own keys (server-round)
        messages = self._configure_train(nxt, candidate, train_cfg)

        def evaluate() -> tuple[dict, float]:
            t = time.perf_counter()
            return self.evaluate(candidate, self.run.candidate, rnd), time.perf_counter() - t

        with ThreadPoolExecutor(1, thread_name_prefix="fedyolo-eval") as pool:
            evaluation = pool.submit(evaluate)
            t0 = time.perf_counter()
            try:
                replies = self.grid.send_and_receive(messages, timeout=timeout)
            except (Interrupted, Exception) as e:
                # round rnd still ends (judged, recorded, saved); then Ctrl-C ends the run, and
                # an exchange that failed (e.g. too few clients for too long) is tried again as
                # round nxt's own, which raises it again if it persists: nothing of round rnd
                # is lost to the next round's trouble
                res, seconds = evaluation.result()
                self.grid.rounds.pop(nxt, None)
                if sampler is not None:
                    sampler.load_state_dict(sampling)
                if not isinstance(e, Interrupted):
                    LOGGER.warning("round %d: its overlapped training failed: %s", nxt, e)
                    self.run.event(
                        nxt,
                        EventKind.ROUND_DISCARDED,
                        reason=f"its exchange failed ({type(e).__name__}: {e}); tried again",
                        replies=0,
                        client_train_seconds=0.0,
                        bytes=0,
                        seconds=round(time.perf_counter() - t0, 3),
                    )
                return res, seconds, None
            except BaseException:
                futures.wait([evaluation])  # never leave candidate.pt half written
                raise
            res, seconds = evaluation.result()
        spec = Speculation(
            nxt, candidate, excluded, asked, replies, sampling, time.perf_counter() - t0
        )
        return res, seconds, spec

    def _discard(self, spec: Speculation, reason: str) -> None:
        """Throw away a speculative round's replies (``round_discarded``): the grid forgets
        what it saw of it, the sampler is as it was before it sampled."""
        log = self.grid.rounds.pop(spec.rnd, None)
        clients = log.clients if log else []
        if self.grid.sampler is not None:
            self.grid.sampler.load_state_dict(spec.sampling)
        lost = sum(float(c.get("train_seconds", 0.0)) for c in clients)
        sent = sum(int(c["bytes_up"]) + int(c["bytes_down"]) for c in clients)
        LOGGER.info("round %d: its overlapped training is discarded: %s", spec.rnd, reason)
        self.run.event(
            spec.rnd,
            EventKind.ROUND_DISCARDED,
            reason=reason,
            replies=len(spec.replies),
            client_train_seconds=round(lost, 3),
            bytes=sent,
            seconds=round(spec.seconds, 3),
        )

    # -- the loop's steps ------------------------------------------------------------------------
    def _check_interrupt(self) -> None:
        """Ctrl-C/SIGTERM between rounds ends the run ``interrupted``."""
        if self.grid.interrupt is not None and self.grid.interrupt.is_set():
            raise Interrupted("interrupted between rounds")

    def _train_config(self, rnd: int) -> ConfigRecord:
        timeout = float(self.cfg.federation.round_timeout)
        t = self.cfg.train
        start, end = lr_schedule.round_rates(
            str(t.lr_schedule), rnd, int(self.cfg.federation.rounds), int(t.epochs), float(t.lrf)
        )
        return self.base_config.with_round(
            lr0=float(t.lr0) * start * self.guard.state.lr_scale,
            round_lrf=end,
            faults=faults_mod.for_round(self.faults, rnd, timeout),
        ).to_record()

    def _strategy_state(self) -> dict:
        return state_mod.strategy_state(self.strategy)

    def _promote(self, candidate: Path, best: bool) -> None:
        """The accepted model becomes ``last.pt`` (and ``best.pt`` when it is the best)."""
        if best:
            _replace(candidate, self.run.best)
        os.replace(candidate, self.run.last)

    def _adopt(self, candidate: ArrayRecord, improved: bool) -> None:
        """The guard accepted ``candidate``: the next round starts from it (kept as the best
        model, weights and strategy state, when it is the best so far)."""
        self.arrays = candidate
        self._promote(self.run.candidate, best=improved)
        if improved:
            self.best = (_copy(candidate), self._strategy_state())

    def _restore_best(self) -> ArrayRecord:
        """The guard rolled back: the best model's weights and strategy state are the global
        model again, and ``best.pt`` is ``last.pt`` (``GuardStep``'s ``restore_best``)."""
        best_arrays, best_strategy = self.best
        self.arrays = best_arrays
        if best_strategy is not None:  # None: a resumed run whose strategy state was not saved
            state_mod.restore_strategy(self.strategy, best_strategy)
        _replace(self.run.best, self.run.last)  # the global model is the best one again
        return best_arrays

    def _record(
        self,
        rnd: int,
        res: dict,
        verdict: Verdict,
        log: RoundLog | None,
        t_last: float,
        eval_seconds: float,
        aggregate_seconds: float,
        lr0: float,
    ) -> RoundRecord:
        """The round's line in ``metrics.jsonl`` (and a ``round_failed`` event when no client
        update was usable), logged with the run's progress."""
        clients = log.clients if log else []
        if self.drift is not None:
            score_data_drift(self.drift, self.run, rnd, clients, log.data_stats if log else {})
        now = time.perf_counter()
        rolled_back = verdict.decision.rolled_back
        global_sha256 = record_digest(self.arrays) if rolled_back else res["weights_sha256"]
        record = round_record(
            rnd,
            res,
            clients=clients,
            client_eval=log.client_eval if log else [],
            failures=log.failed if log else 0,
            transport_seconds=log.transport_seconds if log else 0.0,
            contribution_seconds=verdict.contribution_seconds,
            aggregate_seconds=aggregate_seconds,
            server_rss_mb=self._process.memory_info().rss / 2**20,
            guard=verdict.decision.as_dict(),
            global_sha256=global_sha256,
            round_seconds=now - t_last,
            eval_seconds=eval_seconds,
            lr0=lr0,
        )
        if not clients:
            self.run.event(
                rnd,
                EventKind.ROUND_FAILED,
                reason="no usable client update; the global model is unchanged",
            )
        self.run.add_round(record)
        total = int(self.cfg.federation.rounds)
        left = (now - self.t_start) / max(1, rnd - self.first_round + 1) * (total - rnd)
        log_progress(record, total, rolled_back, self.guard.state, left)
        return record

    def _save_state(self, spec: Speculation | None = None) -> None:
        """The resumable state after ``self.round`` (with a speculation under way, the sampler
        as it was before that speculation sampled: a resumed run samples the round again)."""
        best_w, best_strategy = self.best
        sampler = self.grid.sampler
        sampling = None
        if sampler is not None:
            sampling = spec.sampling if spec is not None else sampler.state_dict()
        state = {
            "round": self.round,
            "weights": self.arrays[WEIGHTS_KEY].numpy().reshape(-1),
            "strategy": state_mod.live_strategy_state(self.strategy),  # encoded, not copied
            "strategy_note": None,
            "best": (best_w[WEIGHTS_KEY].numpy().reshape(-1), best_strategy),
            "guard": self.guard.state_dict(),
            "drift": self.drift.state_dict() if self.drift is not None else None,
            "tracker_task": self.reports.task_id,
            "sampling": sampling,
        }
        skipped = write_state(self.run.state, state)
        if skipped and skipped != self._skipped_warned:
            self._skipped_warned = skipped
            LOGGER.warning("strategy state left out of the resumable state: %s", skipped)

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, status: Status, reason: str | None = None) -> None:
        """Write the run's summary and plot, call the hooks' ``on_end``, then ``run_end``."""
        self.reports.finish(self.round, status, reason)


def log_progress(
    record: RoundRecord, total: int, rolled_back: bool, guard: GuardState, left: float
) -> None:
    """One line per round: its metrics, the guard's word, the best so far, the time left."""
    LOGGER.info(
        "round %d/%d | mAP50-95 %.3f mAP50 %.3f | %s | best %.3f (round %s) | %.1f s "
        "| ~%.0f s left",
        record["round"],
        total,
        record["map50_95"],
        record["map50"],
        "ROLLED BACK" if rolled_back else "accepted",
        guard.best_value or 0.0,
        guard.best_round,
        record["round_seconds"],
        left,
    )


def write_state(path: Path, state: dict) -> list[str]:
    """Save the resumable ``state`` (``fl_server.state``); a strategy state that cannot be
    saved is left out, said in a warning and in the state's ``strategy_note``. What was
    skipped (not data)."""
    try:
        return state_mod.save(path, state)
    except Exception as e:  # noqa: BLE001 - e.g. a plug-in strategy state JSON cannot hold
        LOGGER.warning("the strategy's state cannot be saved for resume: %s", e)
        note = f"not saved ({type(e).__name__}: {e}); the strategy restarted fresh"
        state.update(strategy=None, strategy_note=note, best=(state["best"][0], None))
        return state_mod.save(path, state)


def score_data_drift(
    drift: DriftMonitor, run: RunDir, rnd: int, clients: list[ClientEntry], stats: dict[str, dict]
) -> None:
    """Add each client's data-drift score to its entry; record a drift event when high."""
    for entry in clients:
        s = from_metrics(stats.get(str(entry["id"]), {}))
        if s is None:
            continue
        score = drift.score(str(entry["id"]), rnd, s)
        entry["drift_score"] = score["drift_score"]
        entry["drift_features"] = score["drift_features"]
        if score["drifted"]:
            top = max(score["drift_features"], key=score["drift_features"].get)
            run.event(
                rnd,
                EventKind.DATA_DRIFT,
                client=entry["id"],
                score=score["drift_score"],
                features=score["drift_features"],
                reason=(
                    f"client {entry['id']}'s data moved from its first rounds: score "
                    f"{score['drift_score']:.2f} (most: {top}), above drift.threshold="
                    f"{drift.threshold}"
                ),
            )


def _restored_note(st: dict) -> str:
    """The ``resume`` event's word on the strategy's state."""
    if st["strategy"] is None:
        return str(st["strategy_note"])
    skipped = st.get("skipped") or []
    return "restored" if not skipped else f"restored except {', '.join(skipped)} (not data)"
