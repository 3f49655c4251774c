"""Federated vs centralized training on the same data, model and total epochs.

For each split (IID and a non-IID one), each choice of local epochs per round E and each seed,
this runs the real ``fedyolo run`` for B/E rounds (B = the total epoch budget), then trains the
same model centrally with plain Ultralytics for B epochs on the union of the clients' training
shards, and evaluates both on the same server-only validation set with the same evaluator.

The centralized model is trained with the base hyper-parameters (the benchmark's pinned
``MEASURED_TRAIN``, not ``--extra``: a federated configuration that lowers its learning rate is
compared with the same centralized model) and is cached per seed and budget in
``benchmarks/work/central/``, so every configuration and split of a seed shares one. The one
exception is the learning-rate schedule (``train.lr_schedule``, ``train.lrf``): a federation that
decays its rate is compared with a centralized model that decays it the same way over the same
epochs (Ultralytics' ``lrf``/``cos_lr``), and also, as ``ratio_vs_constant_central``, with the
constant-rate one.

Without ``--seeds`` (one run, seed 0) it writes ``benchmarks/results/fed_vs_central_b<B>.json``;
with ``--seeds`` each row goes, under ``--label``, into
``benchmarks/results/fed_vs_central_seeds.json`` (rows of the same label, split, E, budget and
seed are replaced; the others kept): the record of every configuration tried.

    .venv/bin/python benchmarks/fed_vs_central.py --budget 45 --local-epochs 1,3
    .venv/bin/python benchmarks/fed_vs_central.py --budget 30 --local-epochs 3 --seeds 0,1,2 \\
        --label fedprox-0.01 --splits domain --extra strategy=fedprox strategy.proximal_mu=0.01
    .venv/bin/python benchmarks/fed_vs_central.py --budget 44 --local-epochs 2 --seeds 0,1,2 \
        --splits iid --label linear-central-b32 --fed-from linear --central-batch 32 \
        --extra train.lr_schedule=linear
    .venv/bin/python benchmarks/fed_vs_central.py --budget 44 --local-epochs 2 --seeds 5,6,7 \
        --splits iid --label linear --central-from linear-keep-momentum \
        --extra train.lr_schedule=linear
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import yaml
from benchmarks_common import MEASURED_TRAIN, RESULTS, ROOT, WORK, fedyolo_run, machine, repo_path

from fl_client.data.formats import read_data_yaml

SEEDS_FILE = RESULTS / "fed_vs_central_seeds.json"


def federated(
    name: str, split: str, rounds: int, local: int, extra: list[str]
) -> tuple[Path, dict, float]:
    t0 = time.perf_counter()
    run = fedyolo_run(
        name,
        [f"data.partition={split}", f"federation.rounds={rounds}", f"train.epochs={local}", *extra],
    )
    return run, json.loads((run / "summary.json").read_text()), time.perf_counter() - t0


def recorded_federation(
    label: str, split: str, local: int, budget: int, seed: int
) -> tuple[Path, dict, float]:
    """``label``'s federation of this split, E, budget and seed, as fed_vs_central_seeds.json
    recorded it (its run folder must still be there)."""
    rows = json.loads(SEEDS_FILE.read_text())["rows"] if SEEDS_FILE.exists() else []
    want = (label, split, local, budget, seed)
    ident = ("label", "split", "local_epochs", "epoch_budget", "seed")
    rec = next((r for r in rows if tuple(r[k] for k in ident) == want), None)
    run = ROOT / rec["run_dir"] if rec else None
    if run is None or not (run / "summary.json").exists():
        raise SystemExit(
            f"--fed-from {label}: no recorded run of {dict(zip(ident, want, strict=True))}"
        )
    return run, json.loads((run / "summary.json").read_text()), rec["federated_seconds"]


def recorded_central(
    label: str, run: Path, split: str, budget: int, seed: int, batch: int | None
) -> None:
    """Seed the centralized cache of this run from ``label``'s recorded row of the same split,
    budget, seed and learning-rate schedule (``--central-from``): the centralized model depends on
    nothing else (the base hyper-parameters are pinned here, the shards are generated from the
    seed and the split), so a paired comparison of federations need not train it again."""
    rows = json.loads(SEEDS_FILE.read_text())["rows"] if SEEDS_FILE.exists() else []
    ran = yaml.safe_load((run / "config.yaml").read_text())["train"]
    decayed = ran.get("lr_schedule", "constant") != "constant"
    schedule = f"{ran['lr_schedule']} to lrf {ran['lrf']}" if decayed else "constant"
    rec = next(
        (
            r
            for r in rows
            if (r["label"], r["split"], r["epoch_budget"], r["seed"])
            == (label, split, budget, seed)
            and r.get("lr_schedule", "constant") == schedule
            and r.get("centralized_batch") == batch
        ),
        None,
    )
    if rec is None:
        raise SystemExit(
            f"--central-from {label}: no recorded {split} row of budget {budget}, seed {seed} "
            f"and schedule {schedule!r}"
        )
    seeded = [(True, rec["centralized_map50_95"], rec["centralized_map50"])]
    if decayed and "constant_lr_centralized_map50_95" in rec:
        seeded.append((False, rec["constant_lr_centralized_map50_95"], None))
    for with_schedule, map50_95, map50 in seeded:
        done = central_dir(run, budget, seed, with_schedule, batch) / "result.json"
        if done.exists():
            continue
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(
            json.dumps(
                {
                    "params": central_params(run, seed, with_schedule, batch),
                    "epochs": budget,
                    "result": {"map50_95": map50_95, "map50": map50},
                    "seconds": rec["centralized_seconds"] if with_schedule else None,
                    "from_record": label,
                }
            )
        )


def central_params(run: Path, seed: int, schedule: bool, batch: int | None = None) -> dict:
    """What the centralized model depends on: the base training hyper-parameters, the seed and
    the training images (the union of the run's client shards: the clients' own validation
    images differ between splits, so the union does too); with ``schedule``, the run's
    learning-rate schedule (a constant rate adds no key: the cache of earlier runs stays valid);
    ``batch`` replaces the base batch (``--central-batch``)."""
    from fl_server.config import compose, load

    t = compose([*MEASURED_TRAIN, f"seed={seed}"]).train
    ran = load(run / "config.yaml").train
    decay = (
        {"lr_schedule": str(ran.lr_schedule), "lrf": float(ran.lrf)}
        if schedule and ran.lr_schedule != "constant"
        else {}
    )
    images = hashlib.sha256()
    for digest in sorted(
        hashlib.sha256(f.read_bytes()).hexdigest()
        for f in (run / "data").glob("client_*/train/images/*")
    ):
        images.update(digest.encode())
    return {
        "seed": seed,
        "imgsz": int(t.imgsz),
        "batch": int(batch or t.batch),
        "lr0": float(t.lr0),
        "optimizer": str(t.optimizer),
        "momentum": float(t.momentum),
        "weight_decay": float(t.weight_decay),
        "mosaic": float(t.mosaic),
        "eval_batch": int(t.eval_batch),
        "model": str(load(run / "config.yaml").model.cfg),
        "train_images": images.hexdigest(),
        **decay,
    }


def central_dir(
    run: Path, epochs: int, seed: int, schedule: bool = True, batch: int | None = None
) -> Path:
    """Where :func:`centralized` keeps the model set against ``run`` (its ``train/weights/last.pt``
    and ``result.json`` once trained)."""
    p = central_params(run, seed, schedule, batch)
    key = hashlib.sha256(json.dumps([p, epochs], sort_keys=True).encode()).hexdigest()[:12]
    return WORK / "central" / f"s{seed}-b{epochs}-{key}"


def centralized(
    run: Path, epochs: int, seed: int, schedule: bool = True, batch: int | None = None
) -> tuple[dict, float]:
    """Plain Ultralytics on the union of the run's client training shards (cached), with the
    run's learning-rate schedule unless ``schedule`` is false (then a constant rate)."""
    p = central_params(run, seed, schedule, batch)
    central = central_dir(run, epochs, seed, schedule, batch)
    done = central / "result.json"
    if done.exists():
        d = json.loads(done.read_text())
        return d["result"], d["seconds"]

    from ultralytics import YOLO

    from fl_client.evaluate import evaluate_checkpoint
    from fl_client.model import resolve_model_cfg
    from fl_client.ultralytics_adapter import weights_only_ultralytics

    data = run / "data"
    shards = sorted(str(q / "train" / "images") for q in data.glob("client_*"))
    names = read_data_yaml(data / "server_val" / "data.yaml").names
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
    weights_only_ultralytics()  # a model.cfg that is a .pt is unpickled weights-only, never run
    t0 = time.perf_counter()
    YOLO(resolve_model_cfg(p["model"])).train(
        data=str(data_yaml),
        epochs=epochs,
        imgsz=p["imgsz"],
        batch=p["batch"],
        nbs=p["batch"],
        lr0=p["lr0"],
        lrf=p.get("lrf", 1.0),
        cos_lr=p.get("lr_schedule") == "cos",
        warmup_epochs=0,
        optimizer=p["optimizer"],
        momentum=p["momentum"],
        weight_decay=p["weight_decay"],
        mosaic=p["mosaic"],
        close_mosaic=0,
        device="cpu",
        workers=0,
        seed=seed,
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
        imgsz=p["imgsz"],
        batch=p["eval_batch"],
        device="cpu",
        workdir=central / "val",
    )
    res = {"map50_95": float(res["map50_95"]), "map50": float(res["map50"])}
    done.write_text(json.dumps({"params": p, "epochs": epochs, "result": res, "seconds": seconds}))
    return res, seconds


def row(split, local, rounds, budget, seed, summary, cen, fed_s, cen_s, run, cbatch) -> dict:
    fed_final = summary["final"]["map50_95"]
    ran = yaml.safe_load((run / "config.yaml").read_text())["train"]
    decayed = ran.get("lr_schedule", "constant") != "constant"
    # the constant-rate centralized model is trained only at the base batch
    const = (
        None if cbatch else centralized(run, budget, seed, schedule=False)[0] if decayed else cen
    )
    return {
        "split": split,
        "local_epochs": local,
        "rounds": rounds,
        "epoch_budget": budget,
        "seed": seed,
        "federated_final_map50_95": fed_final,
        "federated_best_map50_95": summary["best"]["map50_95"],
        "federated_final_map50": summary["final"]["map50"],
        "centralized_map50_95": cen["map50_95"],
        "centralized_map50": cen["map50"],
        **({"centralized_batch": cbatch} if cbatch else {}),
        "ratio_final": fed_final / cen["map50_95"] if cen["map50_95"] else None,
        "lr_schedule": f"{ran['lr_schedule']} to lrf {ran['lrf']}" if decayed else "constant",
        **(
            {
                "constant_lr_centralized_map50_95": const["map50_95"],
                "ratio_vs_constant_central": fed_final / const["map50_95"]
                if const["map50_95"]
                else None,
            }
            if const
            else {}
        ),
        "federated_seconds": fed_s,
        "centralized_seconds": cen_s,
        "run_dir": repo_path(run),
    }


def setup(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return {
        "model": cfg["model"]["cfg"],
        "clients": cfg["federation"]["clients"],
        "images": cfg["data"]["synth"]["images"],
        "imgsz": cfg["train"]["imgsz"],
        "domains": cfg["data"]["synth"]["domains"],
        "centralized": "Ultralytics YOLO.train on the union of client train shards, the base "
        "hyper-parameters (no warm-up; the run's learning-rate schedule, constant by default), "
        "EMA weights (last.pt)",
    }


def record_seeds(rows: list[dict], label: str, extra: list[str], run: Path) -> None:
    """Merge ``rows`` under ``label`` into fed_vs_central_seeds.json."""
    d = json.loads(SEEDS_FILE.read_text()) if SEEDS_FILE.exists() else {"configs": {}, "rows": []}
    ident = ("label", "split", "local_epochs", "epoch_budget", "seed")
    new = {tuple(r[k] for k in ident) for r in rows}
    here = machine()
    d.setdefault("machine", here)  # the file's first machine; a row measured elsewhere says so
    rows = [r if here == d["machine"] else {**r, "machine": here} for r in rows]
    d["rows"] = [r for r in d["rows"] if tuple(r[k] for k in ident) not in new] + rows
    d["configs"][label] = " ".join(extra) or "(the defaults)"
    d.update(
        benchmark="fed_vs_central_seeds",
        date=time.strftime("%Y-%m-%d"),
        setup=setup(run),
        note="ratio = federated final / the same seed's centralized model; federated final = "
        "the global model after the last round",
    )
    SEEDS_FILE.write_text(json.dumps(d, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=45, help="total epochs over each image")
    ap.add_argument("--local-epochs", default="1,3", help="local epochs per round to compare")
    ap.add_argument("--splits", default="iid,domain")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (records per label)")
    ap.add_argument("--label", default="fedavg", help="the configuration's name (with --seeds)")
    ap.add_argument("--extra", nargs="*", default=[], help="more fedyolo overrides")
    ap.add_argument(
        "--central-batch",
        type=int,
        default=None,
        help="the centralized model's batch (default: the base's): e.g. the clients' batch × "
        "their number, to compare with one trainer taking as few sequential steps",
    )
    ap.add_argument(
        "--fed-from",
        default=None,
        metavar="LABEL",
        help="(with --seeds) no new federation: reuse LABEL's recorded run of each split, E, "
        "budget and seed (e.g. to set a --central-batch model against it)",
    )
    ap.add_argument(
        "--central-from",
        default=None,
        metavar="LABEL",
        help="(with --seeds) no new centralized model: take LABEL's recorded one of the same "
        "split, budget, seed and schedule (a paired comparison of federations)",
    )
    args = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0]
    rows = []
    for seed in seeds:
        for split in args.splits.split(","):
            for local in (int(e) for e in args.local_epochs.split(",")):
                rounds = args.budget // local
                name = f"fvc-{split}-e{local}"
                if args.seeds:
                    name = f"fvc-{args.label}-{split}-e{local}-b{args.budget}-s{seed}"
                extra = [f"seed={seed}", "tracking.enabled=false", *args.extra]
                if args.fed_from:
                    run, summary, fed_s = recorded_federation(
                        args.fed_from, split, local, args.budget, seed
                    )
                else:
                    run, summary, fed_s = federated(
                        name, split, rounds, local, extra if args.seeds else args.extra
                    )
                if args.central_from:
                    recorded_central(
                        args.central_from, run, split, args.budget, seed, args.central_batch
                    )
                cen, cen_s = centralized(run, args.budget, seed, batch=args.central_batch)
                rows.append(
                    row(
                        split,
                        local,
                        rounds,
                        args.budget,
                        seed,
                        summary,
                        cen,
                        fed_s,
                        cen_s,
                        run,
                        args.central_batch,
                    )
                )
                if args.central_from:
                    rows[-1]["centralized_from"] = args.central_from
                print(json.dumps(rows[-1], indent=2), flush=True)
                if args.seeds:
                    how = [
                        *args.extra,
                        *(
                            [f"(centralized batch {args.central_batch})"]
                            if args.central_batch
                            else []
                        ),
                        *([f"(the federations of {args.fed_from})"] if args.fed_from else []),
                    ]
                    record_seeds([{"label": args.label, **rows[-1]}], args.label, how, run)
    if args.seeds:
        return
    out = {
        "benchmark": "fed_vs_central",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "setup": setup(ROOT / rows[0]["run_dir"]),
        "rows": rows,
        "note": "federated final = the global model after the last round; best = the best "
        "round by held-out mAP50-95 (what best.pt holds)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"fed_vs_central_b{args.budget}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
