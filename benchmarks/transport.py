"""Transport × (bytes per round, final mAP): what each client-update encoding costs and loses.

Runs the real ``fedyolo run`` with FedAvg on the same split, model, seed and budget for each
``transport=``, plus fp32 with another seed as the run-to-run noise reference. Bytes are those
recorded in ``metrics.jsonl``: the serialized Flower messages per client per round. Results go to
``benchmarks/results/transport.json`` after every run.

    .venv/bin/python benchmarks/transport.py --rounds 10 --clients 4 --local-epochs 2
"""

from __future__ import annotations

import json
import os
import time

from benchmarks_common import RESULTS, ROOT, federation_args, fedyolo_run, new_result
from strategies_noniid import mean_client, run_rows

VARIANTS = {
    "fp32": ["transport=fp32"],
    "fp32 (seed 1)": ["transport=fp32", "seed=1"],
    "fp16": ["transport=fp16"],
    "q8": ["transport=q8"],
    "q4": ["transport=q4"],
    "topk 10%": ["transport=topk", "transport.fraction=0.1"],
}


def main() -> None:
    ap = federation_args(__doc__.splitlines()[0])
    ap.add_argument("--partition", default="iid")
    ap.add_argument("--variants", default=",".join(VARIANTS))
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
    for label in args.variants.split(","):
        t0 = time.perf_counter()
        slug = label.replace(" ", "-").replace("(", "").replace(")", "").replace("%", "pct")
        run = fedyolo_run(f"transport-{args.partition}-{slug}", [*base, *VARIANTS[label]])
        rounds = run_rows(run)
        row = {
            "transport": label,
            "bytes_up_per_client_round": mean_client(rounds, "bytes_up"),
            "bytes_down_per_client_round": mean_client(rounds, "bytes_down"),
            "final_map50_95": rounds[-1]["map50_95"],
            "best_map50_95": max(r["map50_95"] for r in rounds),
            "curve_map50_95": [round(r["map50_95"], 4) for r in rounds],
            "seconds": time.perf_counter() - t0,
            "run_dir": str(run.relative_to(ROOT)),
        }
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        out_path.write_text(json.dumps(out, indent=2) + "\n")
    ref = next(r for r in out["rows"] if r["transport"] == "fp32")
    for r in out["rows"]:
        r["bytes_up_reduction"] = ref["bytes_up_per_client_round"] / r["bytes_up_per_client_round"]
        r["map_rel_change"] = (r["final_map50_95"] - ref["final_map50_95"]) / ref["final_map50_95"]
    out_path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
