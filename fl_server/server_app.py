"""The Flower ServerApp: builds the global model, runs the strategy, evaluates every round.

The same ``serve()`` runs in both engines. In the deployment engine (``flwr run .``) the
module-level ``app`` reads the prepared run directory from the run config (``run-dir``); the
simulation engine gets an app bound to the run directory from ``server_app_for()``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fl_client.evaluate import evaluate_checkpoint
from fl_client.model import (
    build_model,
    load_record,
    part_masks,
    record_digest,
    save_checkpoint,
    to_record,
)
from fl_client.train import resolve_device
from fl_server import config as config_mod
from fl_server.observed_grid import Hygiene, ObservedGrid
from fl_server.run_dir import METRIC_KEYS, RunDir, read_jsonl
from strategies import build_strategy

os.environ.setdefault("YOLO_OFFLINE", "1")

LOGGER = logging.getLogger("fedyolo")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = str(context.run_config.get("run-dir", ""))
    if not run_dir:
        raise ValueError("run config 'run-dir' is empty: start runs with `fedyolo run`")
    serve(grid, Path(run_dir))


def server_app_for(run_dir: Path) -> ServerApp:
    """A ServerApp bound to ``run_dir`` (the simulation engine takes app objects)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, run_dir)

    return bound


def round_config(cfg, names: list[str], data_root: Path) -> ConfigRecord:
    """What every client receives each round besides the weights."""
    from strategies import describe

    t = cfg.train
    strategy = describe(cfg)
    dp = (strategy["dp"] or {}).get("kind", "")
    return ConfigRecord(
        {
            "transport": str(cfg.transport.scheme),
            "transport-block": int(cfg.transport.block),
            "transport-fraction": float(cfg.transport.fraction),
            "transport-error-feedback": bool(cfg.transport.error_feedback),
            "keep-local": ",".join(strategy["local"]),
            "dp-clipping": dp.removeprefix("client-") if dp.startswith("client-") else "",
            "model-cfg": str(cfg.model.cfg),
            "names": [str(n) for n in names],
            "data-root": str(data_root),
            "epochs": int(t.epochs),
            "imgsz": int(t.imgsz),
            "batch": int(t.batch),
            "eval-batch": int(t.eval_batch),
            "lr0": float(t.lr0),
            "optimizer": str(t.optimizer),
            "momentum": float(t.momentum),
            "weight-decay": float(t.weight_decay),
            "mosaic": float(t.mosaic),
            "device": str(t.device),
            "amp": bool(t.amp),
            "workers": int(t.workers),
            "seed": int(cfg.seed),
            "threads": int(cfg.engine.get("client_cpus", cfg.engine.get("client_threads", 0))),
        }
    )


class GlobalEvaluator:
    """``evaluate_fn`` of the strategy: checkpoint, evaluate on the held-out set, record."""

    def __init__(self, run: RunDir, cfg, model, grid: ObservedGrid, server_val: Path):
        self.run, self.cfg, self.model, self.grid = run, cfg, model, grid
        self.server_val = server_val
        self.best: float | None = None
        self.t_last = time.perf_counter()
        self.t_start = self.t_last

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t_eval = time.perf_counter()
        load_record(self.model, arrays)
        t = self.cfg.train
        save_checkpoint(
            self.model,
            self.run.last,
            {"imgsz": int(t.imgsz), "data": str(self.server_val)},
            {"round": server_round, "run": self.run.path.name},
        )
        res = evaluate_checkpoint(
            self.run.last,
            self.server_val,
            imgsz=int(t.imgsz),
            batch=int(t.eval_batch),
            device=resolve_device(str(t.device)),
            workdir=self.run.work,
        )
        now = time.perf_counter()
        metrics = {k: res[k] for k in METRIC_KEYS}
        res["weights_sha256"] = record_digest(arrays)
        if server_round == 0:
            self.run.event(0, "initial_eval", **metrics, weights_sha256=res["weights_sha256"])
            LOGGER.info("round 0 (initial model): mAP50-95 %.3f", res["map50_95"])
        else:
            self._record_round(server_round, res, eval_seconds=now - t_eval, now=now)
        self.t_last = time.perf_counter()
        return MetricRecord({k.replace("_", "-"): float(v) for k, v in metrics.items()})

    def _record_round(self, rnd: int, res: dict, eval_seconds: float, now: float) -> None:
        log = self.grid.rounds.get(rnd)
        clients = log.clients if log else []
        record = {
            "round": rnd,
            **{k: res[k] for k in METRIC_KEYS},
            "per_class": res["per_class"],
            "round_seconds": now - self.t_last,
            "eval_seconds": eval_seconds,
            "transport_seconds": log.transport_seconds if log else 0.0,
            "clients": clients,
            "failures": log.failed if log else 0,
            "weights_sha256": res["weights_sha256"],
        }
        if log and log.client_eval:  # federation.fraction_evaluate > 0: clients' own val splits
            record["client_eval"] = log.client_eval
        if not clients:
            self.run.event(
                rnd, "round_failed", reason="no usable client update; the global model is unchanged"
            )
        self.run.add_round(record)
        improved = self.best is None or res["map50_95"] > self.best
        if improved:
            self.best = res["map50_95"]
            tmp = self.run.best.with_suffix(".tmp")
            shutil.copyfile(self.run.last, tmp)
            os.replace(tmp, self.run.best)
        self.run.write_summary(self.run.rounds(), status="running")
        total = int(self.cfg.federation.rounds)
        elapsed = now - self.t_start
        left = elapsed / rnd * (total - rnd)
        LOGGER.info(
            "round %d/%d | mAP50-95 %.3f mAP50 %.3f | best %.3f%s | %.1f s/round | ~%.0f s left",
            rnd,
            total,
            res["map50_95"],
            res["map50"],
            self.best,
            " (new)" if improved else "",
            record["round_seconds"],
            left,
        )


def serve(grid: Grid, run_path: Path) -> None:
    """Run the whole federation for the prepared run directory ``run_path``."""
    import json

    run = RunDir(run_path)
    cfg = config_mod.load(run.config)
    manifest = json.loads(run.manifest.read_text())
    names = manifest["data"]["names"]
    server_val = run.data / "server_val" / "data.yaml"
    model = build_model(str(cfg.model.cfg), names)
    masks = part_masks(model)
    strategy = build_strategy(cfg, run_dir=run, masks=masks)
    agg = cfg.aggregation
    hygiene = Hygiene(
        params_mask=masks["params"],
        max_update_ratio=agg.max_update_ratio,
        max_norm_x_median=agg.max_norm_x_median,
    )
    observed = ObservedGrid(grid, run, hygiene)
    evaluator = GlobalEvaluator(run, cfg, model, observed, server_val)
    rcfg = round_config(cfg, names, run.data)
    run.event(
        0,
        "run_start",
        engine=str(cfg.engine.name),
        strategy=str(cfg.strategy.name),
        transport=str(cfg.transport.scheme),
        clients=int(cfg.federation.clients),
        rounds=int(cfg.federation.rounds),
    )
    status = "failed"
    try:
        strategy.start(
            grid=observed,
            initial_arrays=to_record(model),
            num_rounds=int(cfg.federation.rounds),
            timeout=float(cfg.federation.round_timeout),
            train_config=rcfg,
            evaluate_config=ConfigRecord(dict(rcfg)),
            evaluate_fn=evaluator,
        )
        status = "completed"
    finally:
        rounds = run.rounds()
        summary = run.write_summary(rounds, status=status)
        try:
            run.write_plot(rounds)
            run.write_summary_md(summary, rounds, title=f"fedyolo run {run.path.name}")
        except Exception:  # a plot must never hide the run's outcome
            LOGGER.exception("could not write metrics.png/summary.md")
        run.event(len(rounds), "run_end", status=status)  # last write: the run is complete
    if read_jsonl(run.metrics) and status == "completed":
        LOGGER.info("run finished: %s", run.summary)
