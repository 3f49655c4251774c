"""Federated vs centralized training on the same data, model and total epochs.

For each split (IID and a non-IID one), this runs the real ``fedyolo run`` for R rounds of one
local epoch, then trains the same model centrally with plain Ultralytics for R epochs on the
union of the clients' training shards, and evaluates both on the same server-only validation
set with the same evaluator. Writes ``benchmarks/results/fed_vs_central.json``.

    .venv/bin/python benchmarks/fed_vs_central.py --rounds 15
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from benchmarks_common import machine

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"


def federated(split: str, rounds: int, extra: list[str]) -> tuple[Path, dict, float]:
    name = f"fvc-{split}"
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "fl_server.cli",
        "run",
        f"name={name}",
        f"data.partition={split}",
        f"federation.rounds={rounds}",
        f"output.dir={WORK / 'runs'}",
        "output.overwrite=true",
        *extra,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "YOLO_OFFLINE": "1"})
    run = WORK / "runs" / name
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
    names = yaml.safe_load((data / "server_val" / "data.yaml").read_text())["names"]
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
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--splits", default="iid,domain")
    ap.add_argument("--extra", nargs="*", default=[], help="more fedyolo overrides")
    args = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    rows = []
    for split in args.splits.split(","):
        run, summary, fed_s = federated(split, args.rounds, args.extra)
        cen, cen_s = centralized(run, args.rounds)
        fed_final = summary["final"]["map50_95"]
        rows.append(
            {
                "split": split,
                "rounds": args.rounds,
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
    cfg = yaml.safe_load((WORK / "runs" / f"fvc-{rows[0]['split']}" / "config.yaml").read_text())
    out = {
        "benchmark": "fed_vs_central",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "setup": {
            "model": cfg["model"]["cfg"],
            "clients": cfg["federation"]["clients"],
            "images": cfg["data"]["synth"]["images"],
            "imgsz": cfg["train"]["imgsz"],
            "local_epochs": cfg["train"]["epochs"],
            "domains": cfg["data"]["synth"]["domains"],
            "centralized": "Ultralytics YOLO.train on the union of client train shards, "
            "same hyper-parameters, EMA weights (last.pt)",
        },
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fed_vs_central.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
