"""False triggers of the drift guard on honest federations: replay its rule on real curves.

Every ``metrics.jsonl`` under ``benchmarks/work/runs`` comes from an honest run (no fault
injected) of the other benchmarks (yolov8n, 4 clients, held-out mAP each round). The guard's own
``Guard.check``/``accept`` is replayed on each curve for several (max_drop, min_abs_drop)
settings, without training anything. Up to a run's first trigger the replay is exact (the run
would have been the same up to there); after it the real run would have continued from the best
checkpoint, so only the number of runs with at least one false trigger is reported.

    .venv/bin/python benchmarks/guard_replay.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks_common import RESULTS, WORK, fedyolo_run, machine
from omegaconf import OmegaConf

from fl_server.config import compose
from fl_server.guard import Guard
from fl_server.run_dir import read_jsonl

# honest runs re-run with output.save_matches=true (guard off: the whole honest curve), for the
# significance test's replay: the fed_vs_central and strategies_noniid configurations whose old
# curves fired the 10 % rule at some floor. fvc-<split>-e1 at 45 rounds also covers the 15-round
# fvc-<split> runs (the same configuration, stopped at 15).
FVC = ["federation.clients=2"]
STRAT = ["federation.clients=4", "federation.rounds=10", "train.epochs=2"]
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


def rerun(names: list[str]) -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    for name in names:
        t0 = time.perf_counter()
        fedyolo_run(
            name,
            [*HONEST_RERUNS[name], "guard.enabled=false", "output.save_matches=true"],
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
        cfg = OmegaConf.load(path.parent / "config.yaml")
        faults = cfg.get("faults") or {}
        injected = faults.get("kind") is not None or bool(faults.get("more"))
        if len(rounds) >= 5 and not injected:
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
    }
    (RESULTS / "guard_replay.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
