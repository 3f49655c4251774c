"""False triggers of the drift guard on honest federations: replay its rule on real curves.

Every ``metrics.jsonl`` under ``benchmarks/work/runs`` comes from an honest run (no fault
injected) of the other benchmarks (yolov8n, held-out mAP each round). The guard's own
``Guard.check``/``accept`` is replayed on each curve for several (max_drop, min_abs_drop)
settings, without training anything. Up to a run's first trigger the replay is exact (the run
would have been the same up to there); after it the real run would have continued from the best
checkpoint, so only the number of runs with at least one false trigger is reported.

``significance_rows``: on the runs that kept every evaluation's per-image matches
(``output.save_matches=true``), the whole guard is replayed, the paired bootstrap of the drop
included, exactly as the server runs it. ``--rerun`` first re-runs the honest configurations
whose old curves fired the rule (``HONEST_RERUNS``, ~1.5 h here) with the guard's rollbacks off.

    .venv/bin/python benchmarks/guard_replay.py [--rerun [NAME ...]]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks_common import RESULTS, WORK, fedyolo_run, machine
from omegaconf import OmegaConf

from fl_server.config import compose
from fl_server.guard import Guard, load_images, metric_of
from fl_server.run_dir import read_jsonl

# honest runs re-run with output.save_matches=true (guard off: the whole honest curve), for the
# significance test's replay: the fed_vs_central and strategies_noniid configurations whose old
# curves fired the 10 % rule at some floor. fvc-<split>-e1 at 45 rounds also covers the 15-round
# fvc-<split> runs (the same configuration, stopped at 15).
FVC = ["federation.clients=2"]
# the 4-client runs also score every client's contribution (guard.contribution: needs the guard
# on; its rollback rule is kept from firing by an absolute floor no mAP can drop by)
STRAT = [
    "federation.clients=4",
    "federation.rounds=10",
    "train.epochs=2",
    "guard.enabled=true",
    "guard.min_abs_drop=0.99",
    "guard.contribution=true",
]
HONEST_RERUNS = {
    "honest-fvc-iid-e1": [*FVC, "data.partition=iid", "federation.rounds=45", "train.epochs=1"],
    "honest-fvc-domain-e1": [
        *FVC, "data.partition=domain", "federation.rounds=45", "train.epochs=1"
    ],
    "honest-fvc-domain-e3": [
        *FVC, "data.partition=domain", "federation.rounds=15", "train.epochs=3"
    ],
    "honest-strat-iid-fedbn": [*STRAT, "data.partition=iid", "strategy=fedbn"],
    "honest-strat-domain-fedavgm": [
        *STRAT, "data.partition=domain", "strategy=fedavgm", "strategy.server_momentum=0.7"
    ],
    "honest-strat-dirichlet-0.5-fedprox": [
        *STRAT, "data.partition=dirichlet", "data.alpha=0.5", "strategy=fedprox",
        "strategy.proximal_mu=0.01",
    ],
}  # fmt: skip

SETTINGS = [(0.10, 0.0), (0.10, 0.02), (0.10, 0.03), (0.10, 0.05), (0.10, 0.07), (0.20, 0.05)]


def first_trigger(curve: list[float], max_drop: float, min_abs: float) -> int | None:
    g = Guard(OmegaConf.merge(compose([]).guard, {"max_drop": max_drop, "min_abs_drop": min_abs}))
    g.accept(0, {"map50_95": 0.0})
    for rnd, v in enumerate(curve, start=1):
        if g.check(rnd, {"map50_95": v}).rolled_back:
            return rnd
        g.accept(rnd, {"map50_95": v})
    return None


# (max_drop, min_abs_drop, significance) replayed on the runs that kept per-image matches
SIGNIFICANCE_SETTINGS = [
    (0.10, 0.05, None),
    (0.10, 0.05, 0.05),
    (0.10, 0.0, None),
    (0.10, 0.0, 0.05),
]


def replay_significance(run: Path, max_drop: float, min_abs: float, sig: float | None) -> dict:
    """The whole guard (rule, and the paired bootstrap when ``sig`` is set) on a run that kept
    its per-image matches (``output.save_matches``): exact up to the first rollback, where the
    real run would have gone back to the best checkpoint."""
    cfg = {"enabled": True, "max_drop": max_drop, "min_abs_drop": min_abs, "significance": sig}
    g = Guard(OmegaConf.merge(compose([]).guard, cfg))
    start = next(e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "initial_eval")
    g.accept(0, {"map50_95": start["map50_95"], "images": load_images(run / "eval/round_0000.npz")})
    within, seconds, mismatch = [], [], 0.0
    for rec in read_jsonl(run / "metrics.jsonl"):
        rnd = rec["round"]
        images = load_images(run / "eval" / f"round_{rnd:04d}.npz")
        mismatch = max(mismatch, abs(metric_of(images, "map50_95") - rec["map50_95"]))
        res = {"map50_95": rec["map50_95"], "images": images}
        d = g.check(rnd, res)
        if d.drop_ci is not None:
            seconds.append(d.drop_ci["seconds"])
        if d.rolled_back:
            return {"rollback": rnd, "drop_ci": d.drop_ci, "within_noise": within,
                    "bootstrap_seconds": seconds, "max_metric_mismatch": mismatch}  # fmt: skip
        if d.significant is False:
            within.append({"round": rnd, "drop": d.drop, "abs_drop": d.abs_drop, "ci": d.drop_ci})
        g.accept(rnd, res)
    return {"rollback": None, "within_noise": within, "bootstrap_seconds": seconds,
            "max_metric_mismatch": mismatch}  # fmt: skip


def significance_rows() -> list[dict]:
    runs = sorted(p.parent.parent for p in (WORK / "runs").glob("*/eval/round_0000.npz"))
    runs = [r for r in runs if not injected(r) and len(read_jsonl(r / "metrics.jsonl")) >= 5]
    rows = []
    for max_drop, min_abs, sig in SIGNIFICANCE_SETTINGS:
        per_run = {r.name: replay_significance(r, max_drop, min_abs, sig) for r in runs}
        rolled = {n: v["rollback"] for n, v in per_run.items() if v["rollback"] is not None}
        rows.append(
            {
                "max_drop": max_drop,
                "min_abs_drop": min_abs,
                "significance": sig,
                "runs": len(runs),
                "rounds": sum(len(read_jsonl(r / "metrics.jsonl")) for r in runs),
                "runs_with_false_rollback": len(rolled),
                "first_rollbacks": rolled,
                "per_run": per_run,
            }
        )
        print(f"{max_drop} {min_abs} sig={sig}: {len(rolled)}/{len(runs)} {rolled}", flush=True)
    return rows


def contribution_rows() -> list[dict]:
    """Today's contribution flag rule replayed on every honest run that kept the matches of its
    leave-one-out aggregates (``guard.contribution`` with ``output.save_matches``): every flag
    is an honest client flagged."""
    from fl_server.guard import replay_contributions

    rows = []
    for run in sorted({p.parent.parent for p in (WORK / "runs").glob("*/eval/round_*_all.npz")}):
        if injected(run):
            continue
        records = read_jsonl(run / "metrics.jsonl")
        scores = replay_contributions(Guard(compose([]).guard), run / "eval", records)
        metric = {r["round"]: r["map50_95"] for r in records}
        flags = [
            {
                "round": rnd,
                "client": k,
                "gain_2": v["gain_2"],
                "low": v["ci_2"]["low"],
                "map50_95": metric[rnd],
            }  # fmt: skip
            for rnd in sorted(scores)
            for k, v in sorted(scores[rnd].items())
            if v["flagged"]
        ]
        rows.append({"run": run.name, "rounds": len(scores), "honest_flags": flags})
        print(f"{run.name}: {len(flags)} honest flags {flags}", flush=True)
    return rows


def injected(run: Path) -> bool:
    faults = OmegaConf.load(run / "config.yaml").get("faults") or {}
    return faults.get("kind") is not None or bool(faults.get("more"))


def rerun(names: list[str]) -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    for name in names:
        t0 = time.perf_counter()
        fedyolo_run(
            name,
            ["guard.enabled=false", *HONEST_RERUNS[name], "output.save_matches=true"],
        )
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rerun", nargs="*", help=f"re-run honest runs first: {list(HONEST_RERUNS)}")
    args = ap.parse_args()
    if args.rerun is not None:
        rerun(args.rerun or list(HONEST_RERUNS))
    curves = {}
    for path in sorted((WORK / "runs").glob("*/metrics.jsonl")):
        rounds = read_jsonl(path)
        if len(rounds) >= 5 and not injected(path.parent):
            curves[path.parent.name] = [r["map50_95"] for r in rounds]
    rows = []
    for max_drop, min_abs in SETTINGS:
        hits = {n: first_trigger(c, max_drop, min_abs) for n, c in curves.items()}
        fired = {n: r for n, r in hits.items() if r is not None}
        rows.append(
            {
                "max_drop": max_drop,
                "min_abs_drop": min_abs,
                "runs": len(curves),
                "runs_with_false_trigger": len(fired),
                "first_triggers": fired,
            }
        )
        print(f"max_drop {max_drop} min_abs {min_abs}: {len(fired)}/{len(curves)} runs {fired}")
    out = {
        "benchmark": "guard_replay",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rounds_replayed": sum(len(c) for c in curves.values()),
        "rows": rows,
        # the whole guard, significance test included, on the runs that kept their matches
        "significance_rows": significance_rows(),
        # the contribution flags on honest runs that scored every client
        "contribution_rows": contribution_rows(),
    }
    (RESULTS / "guard_replay.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
