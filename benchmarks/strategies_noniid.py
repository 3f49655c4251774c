"""Strategies × partitions on the synthetic fleet: which strategy for which kind of fleet.

For each partition (IID, Dirichlet α = 0.5 and 0.1 over class labels, one domain per client)
this runs the real ``fedyolo run`` once per strategy with the same model, data, seed and budget
(R rounds of E local epochs), trains the same model centrally for R·E epochs on the union of the
clients' training shards (``fed_vs_central.centralized``), and reports each strategy's final and
best held-out mAP50-95 and the first round reaching 90% of the centralized mAP50-95. Results go
to ``benchmarks/results/strategies_noniid.json`` after every run.

    .venv/bin/python benchmarks/strategies_noniid.py --rounds 10 --clients 4 --local-epochs 2
"""

from __future__ import annotations

import json
import os
import time

from benchmarks_common import RESULTS, federation_args, fedyolo_run, new_result, repo_path
from fed_vs_central import centralized

PARTITIONS = {
    "iid": ["data.partition=iid"],
    "dirichlet-0.5": ["data.partition=dirichlet", "data.alpha=0.5"],
    "dirichlet-0.1": ["data.partition=dirichlet", "data.alpha=0.1"],
    "domain": ["data.partition=domain"],
}
STRATEGIES = {
    "fedavg": ["strategy=fedavg"],
    "fedprox": ["strategy=fedprox", "strategy.proximal_mu=0.01"],
    "fedadam": ["strategy=fedadam", "strategy.eta=0.001"],
    "fedavgm": ["strategy=fedavgm", "strategy.server_momentum=0.7"],
    "fedbn": ["strategy=fedbn"],
}


def run_rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def first_round_at(rounds: list[dict], target: float) -> int | None:
    return next((r["round"] for r in rounds if r["map50_95"] >= target), None)


def mean_client(rounds: list[dict], key: str) -> float:
    values = [c[key] for r in rounds for c in r["clients"]]
    return sum(values) / len(values) if values else 0.0


def main() -> None:
    ap = federation_args(__doc__.splitlines()[0])
    ap.add_argument("--partitions", default=",".join(PARTITIONS))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--keep", action="store_true", help="keep the rows already in the results file")
    args = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    out_path = RESULTS / "strategies_noniid.json"
    out = new_result(
        "strategies_noniid",
        args,
        strategies={k: " ".join(v) for k, v in STRATEGIES.items()},
        centralized="Ultralytics YOLO.train, rounds x local_epochs epochs on the union of "
        "the client train shards, same hyper-parameters",
    )
    if args.keep and out_path.exists():
        kept = json.loads(out_path.read_text())
        out["rows"], out["centralized"] = kept["rows"], kept.get("centralized", {})
        out["setup"]["strategies"].update(kept["setup"]["strategies"])
    done = {(r["partition"], r["strategy"]) for r in out["rows"]}
    base = [
        f"federation.clients={args.clients}",
        f"federation.rounds={args.rounds}",
        f"train.epochs={args.local_epochs}",
    ]
    for part in args.partitions.split(","):
        central = out.get("centralized", {}).get(part)
        for name in args.strategies.split(","):
            if (part, name) in done:
                continue
            t0 = time.perf_counter()
            run = fedyolo_run(f"strat-{part}-{name}", [*base, *PARTITIONS[part], *STRATEGIES[name]])
            seconds = time.perf_counter() - t0
            if central is None:  # one baseline per partition (same shards for every strategy)
                res, central_s = centralized(run, args.rounds * args.local_epochs)
                central = {"map50_95": res["map50_95"], "map50": res["map50"], "seconds": central_s}
                out.setdefault("centralized", {})[part] = central
            rounds = run_rows(run)
            cen = central["map50_95"]
            row = {
                "partition": part,
                "strategy": name,
                "final_map50_95": rounds[-1]["map50_95"],
                "best_map50_95": max(r["map50_95"] for r in rounds),
                "curve_map50_95": [round(r["map50_95"], 4) for r in rounds],
                "centralized_map50_95": cen,
                "ratio_final": rounds[-1]["map50_95"] / cen if cen else None,
                "ratio_best": max(r["map50_95"] for r in rounds) / cen if cen else None,
                "rounds_to_90pct_central": first_round_at(rounds, 0.9 * cen),
                "rejected_updates": sum(r["failures"] for r in rounds),
                "seconds": seconds,
                "run_dir": repo_path(run),
            }
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            out_path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
