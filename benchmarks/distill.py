"""Does federated distillation pay? A teacher trained federatedly, then the same student trained
identically with and without distillation from it, over several seeds.

    python benchmarks/distill.py [--seeds 0,1,2] [--rounds 10]

Everything runs on the built-in synthetic fleet (2 clients, iid); per seed the three runs share
one data version (asserted); every mAP50-95 is on the server's held-out set, which no client
trains on. Target (issue 17): the distilled student closes >= 30% of the student-teacher gap,
(distilled - student) / (teacher - student), on the mean over seeds.
Writes benchmarks/results/distill.json and prints the README's table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks_common import RESULTS, fedyolo_run, machine  # noqa: E402

from fl_server.run_dir import RunDir  # noqa: E402

COMMON = ["federation.clients=2", "tracking.enabled=false"]


def _best(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    rounds = RunDir(run).rounds()
    return {
        "run": str(run),
        "best_map50_95": s["best"]["map50_95"],
        "best_round": s["best"]["round"],
        "final_map50_95": s["final"]["map50_95"],
        "seconds": round(sum(r["round_seconds"] for r in rounds), 1),
        "data_version": json.loads((run / "manifest.json").read_text())["data"]["data_version"],
        "loss_distill_last": [c.get("loss_distill") for c in rounds[-1]["clients"]],
        "bytes_down_total": sum(c["bytes_down"] for r in rounds for c in r["clients"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="yolov8s.yaml")
    ap.add_argument("--student", default="yolov8n.yaml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "distill.json")
    args = ap.parse_args()
    rounds = [f"federation.rounds={args.rounds}"]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    rows = []
    for seed in seeds:  # the seed fixes the synthetic data and partition: one teacher per seed
        base = [*COMMON, *rounds, f"seed={seed}"]
        teacher_run = fedyolo_run(f"distill-teacher-s{seed}", [*base, f"model.cfg={args.teacher}"])
        student = [*base, f"model.cfg={args.student}"]
        teacher = _best(teacher_run)
        plain = _best(fedyolo_run(f"distill-plain-s{seed}", student))
        taught = _best(
            fedyolo_run(
                f"distill-taught-s{seed}",
                [*student, f"distill.teacher={teacher_run / 'best.pt'}"],
            )
        )
        assert plain["data_version"] == taught["data_version"] == teacher["data_version"]
        rows.append({"seed": seed, "teacher": teacher, "plain": plain, "distilled": taught})
        print(
            f"seed {seed}: teacher {teacher['best_map50_95']:.4f}, plain "
            f"{plain['best_map50_95']:.4f}, distilled {taught['best_map50_95']:.4f}",
            flush=True,
        )

    def stats(key: str) -> tuple[float, float]:
        v = [r[key]["best_map50_95"] for r in rows]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    teacher_m, teacher_sd = stats("teacher")
    plain_m, plain_sd = stats("plain")
    taught_m, taught_sd = stats("distilled")
    gap = teacher_m - plain_m
    closed = (taught_m - plain_m) / gap if gap > 0 else None
    result = {
        "benchmark": "distill",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "setup": {
            "teacher": args.teacher,
            "student": args.student,
            "rounds": args.rounds,
            "common": COMMON,
            "seeds": seeds,
            "note": "per seed (data, partition, initialisation): a teacher, then the student "
            "without and with distillation from it; metric: best held-out mAP50-95 over the rounds",
        },
        "rows": rows,
        "summary": {
            "teacher_mean": round(teacher_m, 4),
            "teacher_sd": round(teacher_sd, 4),
            "plain_mean": round(plain_m, 4),
            "plain_sd": round(plain_sd, 4),
            "distilled_mean": round(taught_m, 4),
            "distilled_sd": round(taught_sd, 4),
            "gap_closed": None if closed is None else round(closed, 3),
            "target_met": closed is not None and closed >= 0.30,
        },
        "seconds": round(time.perf_counter() - t0),
    }
    args.out.write_text(json.dumps(result, indent=1))
    s = result["summary"]
    print(
        "| model | held-out mAP50-95 (best round), mean ± sd over seeds |\n|---|---|\n"
        f"| teacher {args.teacher} | {s['teacher_mean']:.4f} ± {s['teacher_sd']:.4f} |\n"
        f"| student {args.student} | {s['plain_mean']:.4f} ± {s['plain_sd']:.4f} |\n"
        f"| student {args.student} distilled | {s['distilled_mean']:.4f} ± "
        f"{s['distilled_sd']:.4f} |\n"
        f"gap closed: {s['gap_closed']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
