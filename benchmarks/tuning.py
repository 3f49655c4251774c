"""Tuning × (gain over the defaults, savings of pruning): does a tuned federation beat the defaults?

1. A study with a pruner (``--pruner``; by default fedyolo's default, ``configs/tuning``) and the
   same study without pruning (same sampler seed, same space, same base): client training
   seconds spent, and the best value each found. ``--unpruned-from STUDY`` runs the pruned study
   only and sets it against an unpruned study recorded in ``results/pruning.json`` (its client
   seconds and best value; the base, trials and sampler seed must be the same).
2. The best configuration of the pruned study and the defaults, each re-run with ``--seeds``
   fresh seeds: mean ± sd of the final held-out mAP50-95 (a gain that survives re-runs).

All values are on the server's held-out set, which no client trains on. Results go to
``benchmarks/results/tuning.json`` (written after every step).

    .venv/bin/python benchmarks/tuning.py --trials 20 --rounds 10 --clients 4 --seeds 3
    .venv/bin/python benchmarks/tuning.py --sampler-seed 1 --seeds 0 --out tuning_live.json \
        --unpruned-from bench-unpruned-s1-20261205-000102 \
        --extra "train.epochs=1 train.batch=16 train.lr_schedule=constant"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchmarks_common import (
    RESULTS,
    ROOT,
    WORK,
    code_commit,
    fedyolo_run,
    machine,
    study_base,
)

# this file is benchmarks/tuning.py: without the repository first on the path, `tuning` would be
# this script instead of the package
sys.path.insert(0, str(ROOT))


def _client_seconds(run_dir: str) -> float:
    from pathlib import Path

    from fl_server.run_dir import RunDir

    return RunDir(Path(run_dir)).client_work()["train_seconds"]  # discarded rounds' too


def study(name: str, base: list[str], args, pruner: str | None) -> dict:
    """A live study of ``pruner`` (None: fedyolo's default)."""
    from tuning.trials import tune

    t0 = time.perf_counter()
    st = tune(
        [
            *base,
            f"tuning.study={name}",
            f"tuning.trials={args.trials}",
            *([f"tuning.pruner={pruner}"] if pruner else []),
            f"tuning.seed={args.sampler_seed}",
            f"output.dir={WORK / 'studies'}",
        ]
    )
    trials = st.optuna_study.get_trials(deepcopy=False)
    best = st.optuna_study.best_trial
    return {
        "study": name,
        "pruner": f"{st.cfg.pruner} on {st.cfg.prune_on}",
        "trials": len(trials),
        "states": {
            s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")
        },
        "best_value": best.value,
        "best_overrides": best.user_attrs["overrides"],
        "client_seconds": sum(
            _client_seconds(t.user_attrs["run_dir"]) for t in trials if "run_dir" in t.user_attrs
        ),
        "wall_seconds": time.perf_counter() - t0,
    }


def reruns(label: str, base: list[str], overrides: list[str], seeds: list[int]) -> dict:
    from fl_server.api import Summary

    finals = []
    for seed in seeds:
        run = fedyolo_run(
            f"tuning-{label}-s{seed}", [*base, *overrides, f"seed={seed}"], pin_train=False
        )
        finals.append(Summary.read(run).final.map50_95)
    return {
        "label": label,
        "overrides": overrides,
        "seeds": seeds,
        "final_map50_95": finals,
        "mean": statistics.mean(finals),
        "sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sampler-seed", type=int, default=0)
    ap.add_argument("--extra", default="", help="more base overrides, space separated")
    ap.add_argument("--out", default="tuning.json")
    ap.add_argument("--pruner", default=None, help="the pruned study's (default: fedyolo's)")
    ap.add_argument(
        "--unpruned-from",
        default=None,
        metavar="STUDY",
        help="no unpruned study: compare with this one, recorded in results/pruning.json",
    )
    ap.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="LABEL=OVERRIDES",
        help="only re-run these configurations (overrides space separated; none = the defaults) "
        "with --seeds seeds each, no studies: e.g. --rerun defaults= --rerun 'b8=train.batch=8'",
    )
    args = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    base = study_base(args)
    out = {
        "benchmark": "tuning",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": code_commit(),
        "setup": {"base": base, "trials": args.trials, "sampler_seed": args.sampler_seed},
        "studies": [],
        "reruns": [],
    }
    path = RESULTS / args.out

    def save() -> None:
        path.write_text(json.dumps(out, indent=1))

    seeds = list(range(1, args.seeds + 1))
    if args.rerun:
        for spec in args.rerun:
            label, _, rest = spec.partition("=")
            out["reruns"].append(reruns(label, base, rest.split(), seeds))
            save()
        print(json.dumps([(r["label"], r["mean"], r["sd"]) for r in out["reruns"]], indent=1))
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    full = recorded_unpruned(args, base) if args.unpruned_from else None
    pruned = study(f"bench-pruned-{stamp}", base, args, args.pruner)
    out["studies"].append(pruned)
    save()
    if full is None:
        full = study(f"bench-full-{stamp}", base, args, "none")
    out["studies"].append(full)
    save()
    out["result"] = {
        "pruning_client_seconds_saved": 1 - pruned["client_seconds"] / full["client_seconds"],
        "best_value_pruned_over_full": pruned["best_value"] / full["best_value"]
        if full["best_value"]
        else None,
    }
    save()
    if seeds:
        out["reruns"].append(reruns("defaults", base, [], seeds))
        save()
        out["reruns"].append(reruns("tuned", base, pruned["best_overrides"], seeds))
        d, t = out["reruns"]
        out["result"]["tuned_over_defaults"] = t["mean"] / d["mean"] if d["mean"] > 0 else None
        save()
    print(json.dumps(out["result"], indent=1))


def recorded_unpruned(args, base: list[str]) -> dict:
    """The unpruned study ``--unpruned-from`` as ``results/pruning.json`` recorded it, refused
    unless its trials and sampler seed are this run's and each of its base overrides (but its
    output folder) is in this run's base. This base may add some (``--extra``: e.g. the training
    defaults of the day it ran, where they have changed since); they are recorded."""
    recorded = json.loads((RESULTS / "pruning.json").read_text())["studies"]
    rec = next((s for s in recorded if s["study"] == args.unpruned_from), None)
    if rec is None:
        raise SystemExit(f"--unpruned-from: no study {args.unpruned_from!r} in pruning.json")
    theirs = [o for o in rec["base"] if not o.startswith("output.dir=")]
    if (
        any(o not in base for o in theirs)
        or rec["trials"] != args.trials
        or rec["sampler_seed"] != args.sampler_seed
    ):
        raise SystemExit(
            f"--unpruned-from {args.unpruned_from}: recorded with base {theirs}, "
            f"{rec['trials']} trials, sampler seed {rec['sampler_seed']}; this run has {base}, "
            f"{args.trials}, {args.sampler_seed}"
        )
    return {
        "study": rec["study"],
        "pruner": "none (recorded in pruning.json)",
        "trials": rec["trials"],
        "client_seconds": rec["client_seconds"],
        "best_value": rec["best_value"],
        "added_to_its_base": [o for o in base if o not in theirs],
    }


if __name__ == "__main__":
    main()
