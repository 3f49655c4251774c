"""Pruners replayed on unpruned studies: how much client time would each save, at what cost?

A study without pruning (``tuning.pruner=none``) trains every trial to its last round and
records each round's held-out mAP50-95 and each client's training seconds in the trial's run
directory. This benchmark runs such studies (one per ``--sampler-seeds`` value, or reads the
ones named with ``--study``) and then replays candidate Optuna pruners over them, trial by trial
in the order they ran, with Optuna's own pruner classes on an in-memory study: a trial reports
its rounds one at a time and stops where the pruner says so. For every candidate:

* ``client_seconds_saved``: 1 - (client training seconds the pruned study would spend) / (the
  unpruned study's). A trial pruned after round r is charged rounds 1..r and, when the run
  overlaps its evaluation (``federation.overlap_eval``), round r+1 too: that round's training had
  started and is discarded (``RunDir.client_work`` charges it the same way in a real study).
* ``best_over_full``: the best objective (best round's mAP50-95) among the trials the pruner
  lets finish, over the unpruned study's best.

What a replay cannot show: with TPE, a real pruned study's sampler sees pruned trials and asks
for other configurations later on; the replay holds the unpruned study's sequence fixed. Its
figures are a pruner's decisions on one fixed sequence of configurations, which is what makes
candidates comparable; ``benchmarks/tuning.py`` runs a real pruned study beside an unpruned one.

    .venv/bin/python benchmarks/pruning.py --trials 20 --rounds 6 --sampler-seeds 0 1
    .venv/bin/python benchmarks/pruning.py --study <study folder> [--study ...]   # replay only

Results: ``benchmarks/results/pruning.json`` (written after every study; a study replayed again
replaces its row, the others are kept: their folders may be gone).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml
from benchmarks_common import RESULTS, ROOT, WORK, machine, study_base

sys.path.insert(0, str(ROOT))  # `tuning` is the package, not benchmarks/tuning.py


def run_study(name: str, base: list[str], trials: int, seed: int) -> Path:
    from tuning.trials import tune

    st = tune(
        [
            *base,
            f"tuning.study={name}",
            f"tuning.trials={trials}",
            "tuning.pruner=none",
            f"tuning.seed={seed}",
            f"output.dir={WORK / 'studies'}",
        ]
    )
    return st.folder


def trial_rounds(folder: Path) -> list[dict]:
    """Each finished trial of a study folder, in order: per-round mAP50-95 and client seconds."""
    from omegaconf import OmegaConf

    from fl_server.run_dir import RunDir

    out = []
    for run in sorted(p for p in (folder / "trials").iterdir() if p.is_dir()):
        rd = RunDir(run)
        rows = [r for r in rd.rounds() if r.get("map50_95") is not None]
        if not rows:
            continue
        cfg = OmegaConf.load(run / "config.yaml")
        out.append(
            {
                "trial": run.name,
                "overlap": bool(cfg.federation.get("overlap_eval", False)),
                "map": [float(r["map50_95"]) for r in rows],
                "loss": [train_loss(r) for r in rows],
                "seconds": [
                    sum(float(c.get("train_seconds", 0.0)) for c in r["clients"]) for r in rows
                ],
            }
        )
    return out


def pruning_value(signal: str, map50_95: float, loss: float) -> float:
    """What a round reports with ``tuning.prune_on=signal`` (tuning/trials.py)."""
    from tuning.trials import pruning_value as value

    return value(signal, map50_95, loss)


def train_loss(record: dict) -> float:
    """The round's training loss as ``tuning.prune_on=loss`` reports it (tuning/trials.py)."""
    from tuning.trials import round_loss

    return round_loss(record)


def candidates(rounds: int) -> dict:
    import optuna

    half = max(1, rounds // 2)
    median = optuna.pruners.MedianPruner
    return {
        "none": lambda: optuna.pruners.NopPruner(),
        "median (warmup 2, startup 3)": lambda: median(n_startup_trials=3, n_warmup_steps=2),
        "median (warmup rounds/2, startup 3)": lambda: median(
            n_startup_trials=3, n_warmup_steps=half
        ),
        "patient median (patience 2, warmup 2)": lambda: optuna.pruners.PatientPruner(
            median(n_startup_trials=3, n_warmup_steps=2), patience=2
        ),
        "percentile 25 (warmup rounds/2, startup 3)": lambda: optuna.pruners.PercentilePruner(
            25.0, n_startup_trials=3, n_warmup_steps=half
        ),
        "hyperband (1..rounds)": lambda: optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=rounds
        ),
        "hyperband (rounds/3..rounds)": lambda: optuna.pruners.HyperbandPruner(
            min_resource=max(1, rounds // 3), max_resource=rounds
        ),
        "successive halving (one rung at rounds/3)": lambda: optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, rounds // 3)
        ),
    }


def replay(trials: list[dict], make_pruner, study_name: str, signal: str = "map") -> dict:
    """Run ``trials`` through one pruner fed ``signal`` (``map``: the round's held-out mAP50-95;
    ``loss``: minus its clients' training loss); what it would have spent and kept."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(), study_name=study_name)
    spent = full = sequential = 0.0
    kept, pruned_at = [], {}
    for t in trials:
        full += sum(t["seconds"])
        trial = study.ask()
        stop = None
        values = [pruning_value(signal, m, v) for m, v in zip(t["map"], t["loss"], strict=True)]
        for step, value in enumerate(values, start=1):
            trial.report(value, step=step)
            if step < len(t["map"]) and trial.should_prune():
                stop = step
                break
        if stop is None:
            spent += sum(t["seconds"])
            sequential += sum(t["seconds"])
            study.tell(trial, max(t["map"]))
            kept.append(max(t["map"]))
        else:
            charged = stop + 1 if t["overlap"] else stop  # the overlapped round is discarded
            spent += sum(t["seconds"][:charged])
            sequential += sum(t["seconds"][:stop])
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            pruned_at[t["trial"]] = stop
    best_full = max(max(t["map"]) for t in trials)
    best = max(kept) if kept else 0.0
    return {
        "pruned": len(pruned_at),
        "pruned_at": pruned_at,
        "client_seconds": spent,
        "client_seconds_saved": 1 - spent / full if full else None,
        # the same decisions with federation.overlap_eval=false: nothing trained after the stop
        # (the completed trials' rounds are charged as they ran, overlapped)
        "client_seconds_saved_sequential": 1 - sequential / full if full else None,
        "best_value": best,
        "best_over_full": best / best_full if best_full > 0 else None,
    }


def draws(trials: list[dict], make_pruner, name: str, signal: str, n: int) -> dict:
    """``replay`` under ``n`` study names: Hyperband puts a trial in a bracket by a hash of the
    study's name and the trial's number, so its savings are a draw; the other pruners give the
    same answer under every name. The first draw's details, and the spread over all of them."""
    runs = [replay(trials, make_pruner, f"{name}-{k}" if k else name, signal) for k in range(n)]
    seq = sorted(r["client_seconds_saved_sequential"] for r in runs)
    best = [r["best_over_full"] for r in runs]
    return {
        **runs[0],
        "draws": n,
        "saved_sequential_median": seq[len(seq) // 2],
        "saved_sequential_min": seq[0],
        "saved_sequential_max": seq[-1],
        "best_over_full_min": min(best),
        "draws_best_within_5pct": sum(b >= 0.95 for b in best) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--sampler-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--study", type=Path, action="append", default=[], help="replay this folder")
    ap.add_argument("--extra", default="", help="more base overrides, space separated")
    ap.add_argument("--draws", type=int, default=20, help="study names to replay Hyperband under")
    ap.add_argument("--out", default="pruning.json")
    args = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    base = study_base(args)
    path = RESULTS / args.out
    kept = json.loads(path.read_text())["studies"] if path.exists() else []
    out = {
        "benchmark": "pruning",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "setup": {"base": base, "trials": args.trials},
        "studies": kept,
    }
    folders = list(args.study)
    if not folders:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for seed in args.sampler_seeds:
            folders.append(run_study(f"bench-unpruned-s{seed}-{stamp}", base, args.trials, seed))
    for folder in folders:
        trials = trial_rounds(folder)
        rounds = max(len(t["map"]) for t in trials)
        study_doc = json.loads((folder / "study.json").read_text())
        row = {
            "study": folder.name,
            "date": time.strftime("%Y-%m-%d"),
            "base": study_doc["base_overrides"],
            "sampler_seed": yaml.safe_load((folder / "tuning.yaml").read_text())["seed"],
            "trials": len(trials),
            "rounds": rounds,
            "client_seconds": sum(sum(t["seconds"]) for t in trials),
            "best_value": max(max(t["map"]) for t in trials),
            "zero_rounds": [sum(v <= 0.0 for v in t["map"]) for t in trials],
            "pruners": {
                f"{name} on {signal}": draws(trials, make, folder.name, signal, args.draws)
                for signal in ("map", "loss", "map+loss")
                for name, make in candidates(rounds).items()
                if not (signal != "map" and name == "none")
            },
        }
        out["studies"] = [s for s in out["studies"] if s["study"] != row["study"]] + [row]
        path.write_text(json.dumps(out, indent=1))
    for row in out["studies"]:
        for name, r in row["pruners"].items():
            print(
                f"{row['study']}: {name:48s} saved {r['client_seconds_saved']:.2f} "
                f"({r['client_seconds_saved_sequential']:.2f} sequential; over draws "
                f"{r['saved_sequential_min']:.2f}-{r['saved_sequential_max']:.2f}) "
                f"best x{r['best_over_full']:.2f} (min {r['best_over_full_min']:.2f}) "
                f"pruned {r['pruned']}"
            )


if __name__ == "__main__":
    main()
