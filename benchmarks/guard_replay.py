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
from typing import Any

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

# (max_drop, min_abs_drop, patience): patience 0 rolls back at the first drop (the guard before
# guard.patience), 1 is today's default (a drop below guard.severe_drop must last two rounds)
SETTINGS = [
    (0.10, 0.0, 0), (0.10, 0.02, 0), (0.10, 0.03, 0), (0.10, 0.05, 0), (0.10, 0.07, 0),
    (0.20, 0.05, 0), (0.10, 0.0, 1), (0.10, 0.02, 1), (0.10, 0.05, 1),
]  # fmt: skip
# honest 10-round curves kept in other benchmarks' results (their run dirs are not in git)
CURVE_RESULTS = ["strategies_noniid.json", "transport.json", "faults.json"]


def replay(curve: list[float], through: bool = False, **guard: Any) -> list[dict]:
    """``Guard.check``/``accept`` on a recorded curve (held-out mAP50-95 of rounds 1..n, round 0
    taken as 0): every round's decision up to and including the first rollback, or with
    ``through`` to the end, each rollback applied (exact on a run that rolled back there)."""
    g = Guard(OmegaConf.merge(compose([]).guard, guard))
    g.accept(0, {"map50_95": 0.0})
    out = []
    for rnd, v in enumerate(curve, start=1):
        d = g.check(rnd, {"map50_95": v}, final=rnd == len(curve))
        out.append({"round": rnd, "decision": d.as_dict()["decision"], "drop": d.drop})
        if d.rolled_back and not through:
            break
        if d.rolled_back:
            g.rolled_back(rnd, [])
        else:
            g.accept(rnd, {"map50_95": v}, probation=d.probation)
    return out


def first_trigger(curve: list[float], max_drop: float, min_abs: float, patience: int) -> int | None:
    steps = replay(curve, max_drop=max_drop, min_abs_drop=min_abs, patience=patience)
    return steps[-1]["round"] if steps and steps[-1]["decision"] == "rollback" else None


def honest_curves() -> dict[str, list[float]]:
    """Every honest curve there is: the run dirs under benchmarks/work/runs (not in git), then
    the honest rows of other benchmarks' results, then the curves this benchmark stored last
    time (so a fresh clone replays what an earlier machine ran)."""
    curves: dict[str, list[float]] = {}
    old = RESULTS / "guard_replay.json"
    if old.is_file():
        curves.update(json.loads(old.read_text()).get("curves") or {})
    for name in CURVE_RESULTS:
        path = RESULTS / name
        for row in json.loads(path.read_text())["rows"] if path.is_file() else []:
            run = row.get("run") or Path(row.get("run_dir", "")).name
            if run and row.get("curve_map50_95") and not row.get("faults_injected"):
                curves[run] = [float(v) for v in row["curve_map50_95"]]
    for path in sorted((WORK / "runs").glob("*/metrics.jsonl")):
        rounds = read_jsonl(path)
        if len(rounds) >= 5 and not injected(path.parent):
            curves[path.parent.name] = [r["map50_95"] for r in rounds]
    return {k: curves[k] for k in sorted(curves) if len(curves[k]) >= 5}


def weight_fault_rows() -> list[dict]:
    """Today's defaults replayed on the recorded curves of the fault benchmark's runs that
    rolled back weight faults: each of those rounds must still roll back, at once."""
    rows = []
    path = RESULTS / "faults.json"
    for row in json.loads(path.read_text())["rows"] if path.is_file() else []:
        if not row.get("rollbacks_correct"):
            continue
        steps = replay(row["curve_map50_95"], through=True)
        rolled = [x["round"] for x in steps if x["decision"] == "rollback"]
        rows.append({"run": row["run"], "weight_fault_rounds": row["rollbacks_correct"],
                     "rolled_back_at": rolled,
                     "all_rolled_back_at_once": rolled == row["rollbacks_correct"]})  # fmt: skip
        print(f"{row['run']}: faults {row['rollbacks_correct']} rolled back at {rolled}")
    return rows


# (max_drop, min_abs_drop, significance) replayed on the runs that kept per-image matches
SIGNIFICANCE_SETTINGS = [
    (0.10, 0.05, None, 0),
    (0.10, 0.05, 0.05, 0),
    (0.10, 0.0, None, 0),
    (0.10, 0.0, 0.05, 0),
    (0.10, 0.05, 0.05, 1),  # today's defaults
    (0.10, 0.0, 0.05, 1),
]


def replay_significance(
    run: Path, max_drop: float, min_abs: float, sig: float | None, patience: int
) -> dict:
    """The whole guard (rule, and the paired bootstrap when ``sig`` is set) on a run that kept
    its per-image matches (``output.save_matches``): exact up to the first rollback, where the
    real run would have gone back to the best checkpoint."""
    cfg = {"enabled": True, "max_drop": max_drop, "min_abs_drop": min_abs, "significance": sig,
           "patience": patience}  # fmt: skip
    g = Guard(OmegaConf.merge(compose([]).guard, cfg))
    start = next(e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "initial_eval")
    g.accept(0, {"map50_95": start["map50_95"], "images": load_images(run / "eval/round_0000.npz")})
    within, probation, seconds, mismatch = [], [], [], 0.0
    records = read_jsonl(run / "metrics.jsonl")
    last = records[-1]["round"]
    for rec in records:
        rnd = rec["round"]
        images = load_images(run / "eval" / f"round_{rnd:04d}.npz")
        mismatch = max(mismatch, abs(metric_of(images, "map50_95") - rec["map50_95"]))
        res = {"map50_95": rec["map50_95"], "images": images}
        d = g.check(rnd, res, final=rnd == last)
        if d.drop_ci is not None:
            seconds.append(d.drop_ci["seconds"])
        if d.rolled_back:
            return {"rollback": rnd, "drop_ci": d.drop_ci, "within_noise": within,
                    "probation": probation, "bootstrap_seconds": seconds,
                    "max_metric_mismatch": mismatch}  # fmt: skip
        if d.significant is False:
            within.append({"round": rnd, "drop": d.drop, "abs_drop": d.abs_drop, "ci": d.drop_ci})
        if d.probation:
            probation.append({"round": rnd, "drop": d.drop, "ci": d.drop_ci})
        g.accept(rnd, res, probation=d.probation)
    return {"rollback": None, "within_noise": within, "probation": probation,
            "bootstrap_seconds": seconds, "max_metric_mismatch": mismatch}  # fmt: skip


def _previous(key: str) -> list[dict]:
    """This benchmark's last results under ``key``: the replays of runs whose directories
    (not in git) are gone are kept, marked ``kept_from``, instead of silently dropped."""
    path = RESULTS / "guard_replay.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    return [{**r, "kept_from": r.get("kept_from") or old["date"]} for r in old.get(key) or []]


def significance_rows() -> list[dict]:
    runs = sorted(p.parent.parent for p in (WORK / "runs").glob("*/eval/round_0000.npz"))
    runs = [r for r in runs if not injected(r) and len(read_jsonl(r / "metrics.jsonl")) >= 5]
    previous = {
        (r["max_drop"], r["min_abs_drop"], r["significance"], r.get("patience", 0)): r
        for r in _previous("significance_rows")
    }
    rows = []
    for max_drop, min_abs, sig, patience in SIGNIFICANCE_SETTINGS:
        per_run = {r.name: replay_significance(r, max_drop, min_abs, sig, patience) for r in runs}
        old = previous.get((max_drop, min_abs, sig, patience)) or {"per_run": {}}
        for name, v in old["per_run"].items():
            if name not in per_run:
                per_run[name] = {**v, "kept_from": v.get("kept_from") or old["kept_from"]}
        per_run = dict(sorted(per_run.items()))
        rolled = {n: v["rollback"] for n, v in per_run.items() if v["rollback"] is not None}
        rows.append(
            {
                "max_drop": max_drop,
                "min_abs_drop": min_abs,
                "significance": sig,
                "patience": patience,
                "runs": len(per_run),
                "rounds_here": sum(len(read_jsonl(r / "metrics.jsonl")) for r in runs),
                "runs_with_false_rollback": len(rolled),
                "first_rollbacks": rolled,
                "per_run": per_run,
            }
        )
        print(f"{max_drop} {min_abs} sig={sig} patience={patience}: {len(rolled)}/{len(per_run)}"
              f" {rolled}", flush=True)  # fmt: skip
    return rows


def contribution_rows() -> list[dict]:
    """Today's contribution flag rule replayed on every honest run that kept the matches of its
    leave-one-out aggregates (``guard.contribution`` with ``output.save_matches``): every flag
    is an honest client flagged. Runs replayed before whose directories are gone are kept."""
    from fl_server.guard import replay_contributions

    rows = []
    for run in sorted({p.parent.parent for p in (WORK / "runs").glob("*/eval/round_*_all.npz")}):
        if injected(run):
            continue
        records = read_jsonl(run / "metrics.jsonl")
        metric = {r["round"]: r["map50_95"] for r in records}
        row: dict[str, Any] = {"run": run.name}
        # today's rule, and leave-one-out alone (guard.flag_agreement=null) for comparison
        for key, over in (
            ("honest_flags", {}),
            ("honest_flags_loo_alone", {"flag_agreement": None}),
        ):
            guard = Guard(OmegaConf.merge(compose([]).guard, over))
            scores = replay_contributions(guard, run / "eval", records)
            row["rounds"] = len(scores)
            row[key] = [
                {
                    "round": rnd,
                    "client": k,
                    "gain_2": v["gain_2"],
                    "low": v["ci_2"]["low"],
                    "agreement": v["agreement"],
                    "map50_95": metric[rnd],
                }  # fmt: skip
                for rnd in sorted(scores)
                for k, v in sorted(scores[rnd].items())
                if v["flagged"]
            ]
        rows.append(row)
        alone = len(row["honest_flags_loo_alone"])
        print(f"{run.name}: {len(row['honest_flags'])} honest flags, {alone} with LOO alone")
    here = {r["run"] for r in rows}
    rows += [r for r in _previous("contribution_rows") if r["run"] not in here]
    return sorted(rows, key=lambda r: r["run"])


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
    curves = honest_curves()
    rows = []
    for max_drop, min_abs, patience in SETTINGS:
        hits = {n: first_trigger(c, max_drop, min_abs, patience) for n, c in curves.items()}
        fired = {n: r for n, r in hits.items() if r is not None}
        rows.append(
            {
                "max_drop": max_drop,
                "min_abs_drop": min_abs,
                "patience": patience,
                "runs": len(curves),
                "runs_with_false_trigger": len(fired),
                "first_triggers": fired,
            }
        )
        print(f"max_drop {max_drop} min_abs {min_abs} patience {patience}: "
              f"{len(fired)}/{len(curves)} runs {fired}")  # fmt: skip
    out = {
        "benchmark": "guard_replay",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rounds_replayed": sum(len(c) for c in curves.values()),
        "rows": rows,
        # every weight fault of benchmarks/faults.py, replayed with today's defaults
        "weight_fault_rows": weight_fault_rows(),
        # the honest curves replayed (kept: the run dirs are not in git)
        "curves": {n: [round(v, 6) for v in c] for n, c in curves.items()},
        # the whole guard, significance test included, on the runs that kept their matches
        "significance_rows": significance_rows(),
        # the contribution flags on honest runs that scored every client
        "contribution_rows": contribution_rows(),
    }
    (RESULTS / "guard_replay.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
