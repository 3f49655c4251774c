"""Federated vs centralized training on the same data, model and total epochs.

For each split (IID and a non-IID one) and each choice of local epochs per round E, this runs
the real ``fedyolo run`` for B/E rounds (B = the total epoch budget), then trains the same model
centrally with plain Ultralytics for B epochs on the union of the clients' training shards, and
evaluates both on the same server-only validation set with the same evaluator. Writes
``benchmarks/results/fed_vs_central_b<B>.json``.

    .venv/bin/python benchmarks/fed_vs_central.py --budget 45 --local-epochs 1,3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml
from benchmarks_common import RESULTS, ROOT, WORK, fedyolo_run, machine

from fl_client.data.formats import read_data_yaml


def federated(split: str, rounds: int, local: int, extra: list[str]) -> tuple[Path, dict, float]:
    t0 = time.perf_counter()
    run = fedyolo_run(
        f"fvc-{split}-e{local}",
        [f"data.partition={split}", f"federation.rounds={rounds}", f"train.epochs={local}", *extra],
    )
    return run, json.loads((run / "summary.json").read_text()), time.perf_counter() - t0


def centralized(run: Path, epochs: int) -> tuple[dict, float]:
    """Plain Ultralytics on the union of the run's client training shards."""
    from ultralytics import YOLO

    from fl_client.evaluate import evaluate_checkpoint
    from fl_client.model import resolve_model_cfg
    from fl_server.config import load

    cfg = load(run / "config.yaml")
    data = run / "data"
    shards = sorted(str(p / "train" / "images") for p in data.glob("client_*"))
    names = read_data_yaml(data / "server_val" / "data.yaml").names
    central = WORK / "central" / run.name
    central.mkdir(parents=True, exist_ok=True)
    data_yaml = central / "data.yaml"
    data_yaml.write_text(
        yaml.safe_dump(
            {
                "path": str(data),
                "train": shards,
                "val": str(data / "server_val" / "images"),
                "names": names,
            }
        )
    )
    t = cfg.train
    t0 = time.perf_counter()
    YOLO(resolve_model_cfg(str(cfg.model.cfg))).train(
        data=str(data_yaml),
        epochs=epochs,
        imgsz=int(t.imgsz),
        batch=int(t.batch),
        nbs=int(t.batch),
        lr0=float(t.lr0),
        lrf=1.0,
        warmup_epochs=0,
        optimizer=str(t.optimizer),
        momentum=float(t.momentum),
        weight_decay=float(t.weight_decay),
        mosaic=float(t.mosaic),
        close_mosaic=0,
        device="cpu",
        workers=0,
        seed=int(cfg.seed),
        deterministic=False,
        plots=False,
        val=False,
        project=str(central),
        name="train",
        exist_ok=True,
        verbose=False,
    )
    seconds = time.perf_counter() - t0
    last = central / "train" / "weights" / "last.pt"
    res = evaluate_checkpoint(
        last,
        data / "server_val" / "data.yaml",
        imgsz=int(t.imgsz),
        batch=int(t.eval_batch),
        device="cpu",
        workdir=central / "val",
    )
    return res, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=45, help="total epochs over each image")
    ap.add_argument("--local-epochs", default="1,3", help="local epochs per round to compare")
    ap.add_argument("--splits", default="iid,domain")
    ap.add_argument("--extra", nargs="*", default=[], help="more fedyolo overrides")
    args = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    rows = []
    for split in args.splits.split(","):
        central = None
        for local in (int(e) for e in args.local_epochs.split(",")):
            rounds = args.budget // local
            run, summary, fed_s = federated(split, rounds, local, args.extra)
            if central is None:  # the same partition for every E: one centralized baseline
                central = centralized(run, args.budget)
            cen, cen_s = central
            fed_final = summary["final"]["map50_95"]
            rows.append(
                {
                    "split": split,
                    "local_epochs": local,
                    "rounds": rounds,
                    "epoch_budget": args.budget,
                    "federated_final_map50_95": fed_final,
                    "federated_best_map50_95": summary["best"]["map50_95"],
                    "federated_final_map50": summary["final"]["map50"],
                    "centralized_map50_95": cen["map50_95"],
                    "centralized_map50": cen["map50"],
                    "ratio_final": fed_final / cen["map50_95"] if cen["map50_95"] else None,
                    "federated_seconds": fed_s,
                    "centralized_seconds": cen_s,
                    "run_dir": str(run.relative_to(ROOT)),
                }
            )
            print(json.dumps(rows[-1], indent=2), flush=True)
    cfg = yaml.safe_load((ROOT / rows[0]["run_dir"] / "config.yaml").read_text())
    out = {
        "benchmark": "fed_vs_central",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "setup": {
            "model": cfg["model"]["cfg"],
            "clients": cfg["federation"]["clients"],
            "images": cfg["data"]["synth"]["images"],
            "imgsz": cfg["train"]["imgsz"],
            "domains": cfg["data"]["synth"]["domains"],
            "centralized": "Ultralytics YOLO.train on the union of client train shards, "
            "same hyper-parameters, EMA weights (last.pt)",
        },
        "rows": rows,
        "note": "federated final = the global model after the last round; best = the best "
        "round by held-out mAP50-95 (what best.pt holds)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"fed_vs_central_b{args.budget}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
