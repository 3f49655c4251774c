"""Do the federated models lose to the centralized ones through their BatchNorm statistics?

FedAvg averages each BatchNorm layer's running mean and variance over the clients, and each
client measured its own on its own weights, not on the averaged model the server evaluates. If
that mismatch cost accuracy, statistics measured for the final weights themselves would win it
back. For each federation of ``--label`` that ``fed_vs_central.py --seeds`` recorded (its run
folder still there) and the same seed's centralized model (``benchmarks/work/central``), this
re-estimates every BatchNorm layer's running statistics for the final weights, a cumulative
average over ``--passes`` passes of the union of the clients' training images with
Ultralytics' training augmentation (the statistics the weights were trained with; no weight
changes), and evaluates each model on the server's held-out set before and after, with the
same evaluator. The centralized model is the control: what the re-estimation does to a model
whose statistics never were averaged. Results: ``benchmarks/results/bn_refresh.json``, a row
per label, split and seed (a re-run replaces its own rows and keeps the others).

    .venv/bin/python benchmarks/bn_refresh.py --label linear --splits iid,domain --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import yaml
from benchmarks_common import RESULTS, WORK, code_commit, machine
from fed_vs_central import central_dir, recorded_federation

OUT = RESULTS / "bn_refresh.json"


def training_batches(data: Path, work: Path, imgsz: int, batch: int, passes: int):
    """Batches of the union of the clients' training images as Ultralytics' trainer augments
    them (its default augmentation, no mosaic: the federations' setting), scaled to [0, 1]."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    shards = sorted(str(q / "train" / "images") for q in data.glob("client_*"))
    names = yaml.safe_load((data / "server_val" / "data.yaml").read_text())["names"]
    data_yaml = work / "data.yaml"
    data_yaml.write_text(
        yaml.safe_dump(
            {"path": str(data), "train": shards, "val": str(data / "server_val"), "names": names}
        )
    )
    cfg = get_cfg(overrides={"imgsz": imgsz, "batch": batch, "mosaic": 0.0, "workers": 0})
    dataset = build_yolo_dataset(cfg, shards, batch, check_det_dataset(str(data_yaml)), "train")
    loader = build_dataloader(dataset, batch, 0, shuffle=True)
    for _ in range(passes):
        for b in loader:
            yield b["img"].float() / 255


def refresh_bn(model: torch.nn.Module, batches) -> int:
    """Every BatchNorm layer's running statistics re-estimated from ``batches`` (a cumulative
    average: ``momentum=None``), the weights untouched; returns the number of layers."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return len(bns)


def before_after(ckpt: Path, data: Path, work: Path, imgsz: int, passes: int) -> dict:
    from fl_client.evaluate import evaluate_checkpoint
    from fl_client.model import save_checkpoint
    from fl_client.ultralytics_adapter import load_checkpoint

    def held_out(path: Path, name: str) -> float:
        val = data / "server_val" / "data.yaml"
        res = evaluate_checkpoint(
            path, val, imgsz=imgsz, batch=32, device="cpu", workdir=work / name
        )
        return float(res["map50_95"])

    model, _ = load_checkpoint(ckpt, "bn_refresh")
    work.mkdir(parents=True, exist_ok=True)
    layers = refresh_bn(model, training_batches(data, work, imgsz, 32, passes))
    refreshed = save_checkpoint(model, work / "refreshed.pt", {"imgsz": imgsz}, {})
    before, after = held_out(ckpt, "before"), held_out(refreshed, "after")
    return {"before": before, "after": after, "change": after - before, "bn_layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="linear", help="a label of fed_vs_central_seeds.json")
    ap.add_argument("--splits", default="iid")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--budget", type=int, default=44)
    ap.add_argument("--passes", type=int, default=2, help="passes over the training images")
    args = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    rows = []
    for split in args.splits.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            run, _, _ = recorded_federation(args.label, split, args.local_epochs, args.budget, seed)
            imgsz = int(yaml.safe_load((run / "config.yaml").read_text())["train"]["imgsz"])
            central = central_dir(run, args.budget, seed) / "train" / "weights" / "last.pt"
            if not central.exists():
                raise SystemExit(f"no centralized model for {run.name}: run fed_vs_central.py")
            row = {
                "label": args.label,
                "split": split,
                "seed": seed,
                "local_epochs": args.local_epochs,
                "epoch_budget": args.budget,
                "passes": args.passes,
                "date": time.strftime("%Y-%m-%d"),
                "commit": code_commit(),
                "run_dir": run.name,
            }
            for kind, ckpt in (("federated", run / "last.pt"), ("centralized", central)):
                work = WORK / "bn_refresh" / f"{run.name}-{kind}"
                row[kind] = before_after(ckpt, run / "data", work, imgsz, args.passes)
            rows.append(row)
            print(json.dumps(row), flush=True)
    ident = ("label", "split", "seed", "local_epochs", "epoch_budget", "passes")
    kept = json.loads(OUT.read_text())["rows"] if OUT.exists() else []
    new = {tuple(r[k] for k in ident) for r in rows}
    rows = [r for r in kept if tuple(r.get(k) for k in ident) not in new] + rows
    OUT.write_text(
        json.dumps(
            {
                "benchmark": "bn_refresh",
                "machine": machine(),
                "statistics": "cumulative average over the union of the clients' training "
                "images, Ultralytics' training augmentation without mosaic",
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
