"""The update-norm rules replayed on recorded honest federations: which limit drops nobody honest
and still drops a ×10 scaled update?

Every ``metrics.jsonl`` under ``--runs`` (default ``benchmarks/work``: the benchmarks' runs and
the tuning studies' trials) whose config injects no fault is read; each client record holds the
server-measured ``update_norm`` and the client's ``batches``. For each round with 3+ replies:

* **honest drops**: replies the rule would drop (per-step rule: ``norm / batches`` above
  ``k`` × the round's median; raw rule: ``norm`` above ``k`` × the median);
* **×10 caught**: each reply in turn multiplied by 10 (the ``scaled_weights`` fault: the norm of
  10 × the update is exactly 10 × its norm), the median recomputed with it, and whether the rule
  drops it.

This is a replay of the rules on recorded norms, not new training; ``benchmarks/faults.py``
checks the default in a real federation. Results: ``benchmarks/results/norm_replay.json``.

    .venv/bin/python benchmarks/norm_replay.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml
from benchmarks_common import RESULTS, WORK, machine

from fl_server.run_dir import RunDir

LIMITS = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
SCALE = 10.0


def honest(run: Path) -> bool:
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    f = cfg.get("faults") or {}
    return not f.get("kind") and not f.get("more")


def rounds_of(run: Path) -> list[list[tuple[float, float]]]:
    """Per round: (norm, batches) of each reply that has both."""
    out = []
    for r in RunDir(run).rounds():
        pairs = [
            (float(c["update_norm"]), float(c["batches"]))
            for c in r.get("clients", [])
            if c.get("update_norm") is not None and (c.get("batches") or 0) >= 1
        ]
        if len(pairs) >= 3:
            out.append(pairs)
    return out


def ratios(pairs: list[tuple[float, float]], per_step: bool) -> list[float]:
    values = [n / b if per_step else n for n, b in pairs]
    m = statistics.median(values)
    return [v / m for v in values]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=WORK)
    ap.add_argument("--out", default="norm_replay.json")
    args = ap.parse_args()
    runs = sorted(
        p.parent
        for p in args.runs.rglob("metrics.jsonl")
        if (p.parent / "config.yaml").is_file() and honest(p.parent)
    )
    data = {str(r.relative_to(args.runs)): rounds_of(r) for r in runs}
    data = {k: v for k, v in data.items() if v}
    rows = []
    for per_step in (True, False):
        all_ratios = [x for rs in data.values() for p in rs for x in ratios(p, per_step)]
        for k in LIMITS:
            drops = caught = tried = 0
            dropped_runs = set()
            for name, rs in data.items():
                for pairs in rs:
                    bad = sum(x > k for x in ratios(pairs, per_step))
                    drops += bad
                    if bad:
                        dropped_runs.add(name)
                    for i in range(len(pairs)):
                        scaled = list(pairs)
                        scaled[i] = (pairs[i][0] * SCALE, pairs[i][1])
                        tried += 1
                        caught += ratios(scaled, per_step)[i] > k
            rows.append(
                {
                    "rule": "per_step" if per_step else "raw",
                    "limit": k,
                    "honest_replies": len(all_ratios),
                    "honest_dropped": drops,
                    "runs_with_a_drop": sorted(dropped_runs),
                    "scaled_x10_caught": caught,
                    "scaled_x10_tried": tried,
                    "max_honest_ratio": max(all_ratios),
                }
            )
    out = {
        "benchmark": "norm_replay",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": len(data),
        "rounds": sum(len(v) for v in data.values()),
        "run_names": sorted(data),
        "rows": rows,
    }
    (RESULTS / args.out).write_text(json.dumps(out, indent=1))
    print(f"{out['runs']} honest runs, {out['rounds']} rounds with 3+ replies")
    for r in rows:
        print(
            f"{r['rule']:8} k={r['limit']:<4} honest dropped {r['honest_dropped']:4}/"
            f"{r['honest_replies']}  x10 caught {r['scaled_x10_caught']:4}/{r['scaled_x10_tried']}"
            f"  max honest ratio {r['max_honest_ratio']:.2f}"
        )


if __name__ == "__main__":
    main()
