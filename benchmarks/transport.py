"""Transport × (bytes per round, final mAP): what each client-update encoding costs and loses.

Runs the real ``fedyolo run`` with FedAvg on the same split, model, seed and budget for each
``transport=``, plus fp32 with other seeds as the run-to-run noise reference. Bytes are those
recorded in ``metrics.jsonl``: the serialized Flower messages per client per round. Results go to
``benchmarks/results/transport.json`` after every run; ``--merge`` keeps the rows of variants
not run this time (each row says when it was measured).

``q4z`` compresses both ways (``transport.down=q4z``): round 1 brings the model whole, later
rounds the step from the model a client holds, so a run's mean down depends on its length;
``bytes_down_after_first_round`` is the steady state. The targets (issue 32, item 2): ≥ 8× fewer
bytes both ways, final mAP50-95 of every q4z seed inside the fp32 seeds' range.

    .venv/bin/python benchmarks/transport.py --rounds 10 --clients 4 --local-epochs 2
    .venv/bin/python benchmarks/transport.py --rounds 10 --clients 4 --local-epochs 2 --merge \
        --variants "fp32,fp32 (seed 1),fp32 (seed 2),q4z,q4z (seed 1),q4z (seed 2)"
"""

from __future__ import annotations

import json
import os
import time

from benchmarks_common import RESULTS, federation_args, fedyolo_run, new_result, repo_path
from strategies_noniid import mean_client, run_rows

VARIANTS = {
    "fp32": ["transport=fp32"],
    "fp32 (seed 1)": ["transport=fp32", "seed=1"],
    "fp16": ["transport=fp16"],
    "q8": ["transport=q8"],
    "q4": ["transport=q4"],
    "topk 10%": ["transport=topk", "transport.fraction=0.1"],
    "fp32 (seed 2)": ["transport=fp32", "seed=2"],
    "q4z": ["transport=q4z"],  # both ways (configs/transport/q4z.yaml: down q4z)
    "q4z (seed 1)": ["transport=q4z", "seed=1"],
    "q4z (seed 2)": ["transport=q4z", "seed=2"],
    "fp32 (seed 3)": ["transport=fp32", "seed=3"],
    "fp32 (seed 4)": ["transport=fp32", "seed=4"],
    "q4z (seed 3)": ["transport=q4z", "seed=3"],
    "q4z (seed 4)": ["transport=q4z", "seed=4"],
}


def _after_first(rounds: list[dict], key: str) -> float:
    return mean_client(rounds[1:], key) if len(rounds) > 1 else float("nan")


def _targets(rows: list[dict]) -> dict:
    """Issue 32's transport targets, from the rows: q4z against the fp32 seeds."""
    fp32 = [r for r in rows if r["transport"].startswith("fp32")]
    q4z = [r for r in rows if r["transport"].startswith("q4z")]
    if not fp32 or not q4z:
        return {}
    low = min(r["final_map50_95"] for r in fp32)
    high = max(r["final_map50_95"] for r in fp32)
    up = min(r["bytes_up_reduction"] for r in q4z)
    down = min(r["bytes_down_reduction_after_first_round"] for r in q4z)
    return {
        "fp32_final_range": [low, high],
        "q4z_finals": [r["final_map50_95"] for r in q4z],
        "q4z_inside_fp32_range": all(low <= r["final_map50_95"] <= high for r in q4z),
        "q4z_at_least_fp32_low": all(r["final_map50_95"] >= low for r in q4z),
        "up_reduction_min": up,
        "down_reduction_after_first_round_min": down,
        "down_reduction_run_mean_min": min(r["bytes_down_reduction"] for r in q4z),
        "met_8x_both_ways": up >= 8 and down >= 8,
    }


def main() -> None:
    ap = federation_args(__doc__.splitlines()[0])
    ap.add_argument("--partition", default="iid")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--merge", action="store_true", help="keep the rows of variants not run")
    args = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    out_path = RESULTS / "transport.json"
    out = new_result(
        "transport",
        args,
        strategy="fedavg",
        partition=args.partition,
        bytes="serialized Flower Message (protobuf) per client per round, as recorded in "
        "metrics.jsonl",
    )
    base = [
        f"federation.clients={args.clients}",
        f"federation.rounds={args.rounds}",
        f"train.epochs={args.local_epochs}",
        f"data.partition={args.partition}",
    ]
    labels = args.variants.split(",")
    if args.merge and out_path.exists():
        old = json.loads(out_path.read_text())
        out["rows"] = [
            {**r, "measured": r.get("measured", old["date"])}
            for r in old["rows"]
            if r["transport"] not in labels
        ]
    for label in labels:
        t0 = time.perf_counter()
        slug = label.replace(" ", "-").replace("(", "").replace(")", "").replace("%", "pct")
        run = fedyolo_run(f"transport-{args.partition}-{slug}", [*base, *VARIANTS[label]])
        rounds = run_rows(run)
        row = {
            "transport": label,
            "bytes_up_per_client_round": mean_client(rounds, "bytes_up"),
            "bytes_down_per_client_round": mean_client(rounds, "bytes_down"),
            "bytes_up_after_first_round": _after_first(rounds, "bytes_up"),
            "bytes_down_after_first_round": _after_first(rounds, "bytes_down"),
            "final_map50_95": rounds[-1]["map50_95"],
            "best_map50_95": max(r["map50_95"] for r in rounds),
            "curve_map50_95": [round(r["map50_95"], 4) for r in rounds],
            "seconds": time.perf_counter() - t0,
            "run_dir": repo_path(run),
            "measured": out["date"],
        }
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        out_path.write_text(json.dumps(out, indent=2) + "\n")
    ref = next(r for r in out["rows"] if r["transport"] == "fp32")
    for r in out["rows"]:
        r["bytes_up_reduction"] = ref["bytes_up_per_client_round"] / r["bytes_up_per_client_round"]
        r["bytes_down_reduction"] = (
            ref["bytes_down_per_client_round"] / r["bytes_down_per_client_round"]
        )
        if "bytes_down_after_first_round" in r:
            r["bytes_down_reduction_after_first_round"] = (
                ref["bytes_down_per_client_round"] / r["bytes_down_after_first_round"]
            )
        if r.get("measured") == ref.get("measured"):  # a kept row keeps its own day's change
            r["map_rel_change"] = (r["final_map50_95"] - ref["final_map50_95"]) / ref[
                "final_map50_95"
            ]
    out["targets"] = _targets(out["rows"])
    out_path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
