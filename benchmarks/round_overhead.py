"""Where a round's wall time goes: client training vs everything else, on both engines.

Runs the real ``fedyolo run`` on each engine and splits every round's wall time (server's view:
from the end of one round's evaluation to the end of the next) into

* ``training``: the slowest client's time inside Ultralytics' epoch loop (loading batches,
  forward, backward, optimiser step): the clients run in parallel, so the slowest one is on
  the critical path;
* ``everything else``: process start-up and imports, trainer set-up, weight (de)serialisation,
  transport, aggregation and the server's evaluation. ``eval_seconds`` and the slowest client's
  ``setup_seconds`` are reported separately.

Writes ``benchmarks/results/round_overhead.json``.

    .venv/bin/python benchmarks/round_overhead.py --rounds 6 --deploy-rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks_common import RESULTS, fedyolo_run, machine


def run(engine: str, rounds: int, extra: list[str]) -> Path:
    return fedyolo_run(
        f"overhead-{engine}", [f"engine={engine}", f"federation.rounds={rounds}", *extra]
    )


def split(run_dir: Path) -> dict:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        train = max(c["train_seconds"] for c in r["clients"])
        rows.append(
            {
                "round": r["round"],
                "round_seconds": r["round_seconds"],
                "training_seconds": train,
                "other_seconds": r["round_seconds"] - train,
                "other_share": 1 - train / r["round_seconds"],
                "eval_seconds": r["eval_seconds"],
                "client_setup_seconds": max(c["setup_seconds"] for c in r["clients"]),
                "client_handler_seconds": max(c["handler_seconds"] for c in r["clients"]),
            }
        )
    steady = rows[1:] if len(rows) > 1 else rows

    def mean(key: str, rs: list[dict]) -> float:
        return statistics.fmean(r[key] for r in rs)

    summary = {
        k: mean(k, steady)
        for k in (
            "round_seconds",
            "training_seconds",
            "other_seconds",
            "eval_seconds",
            "client_setup_seconds",
        )
    }
    summary["other_share"] = 1 - summary["training_seconds"] / summary["round_seconds"]
    return {"steady_state_rounds_2_to_n": summary, "round_1": rows[0], "rounds": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--deploy-rounds", type=int, default=3)
    ap.add_argument("--engines", default="simulation,local-deployment")
    ap.add_argument("--extra", nargs="*", default=[], help="more fedyolo overrides")
    args = ap.parse_args()
    out = {
        "benchmark": "round_overhead",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "overrides": args.extra,
        "engines": {},
    }
    for engine in args.engines.split(","):
        rounds = args.rounds if engine == "simulation" else args.deploy_rounds
        run_dir = run(engine, rounds, args.extra)
        cfg = (run_dir / "config.yaml").read_text()
        out["engines"][engine] = {"rounds": rounds, **split(run_dir)}
        out["config"] = cfg
        print(engine, json.dumps(out["engines"][engine]["steady_state_rounds_2_to_n"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "round_overhead.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
