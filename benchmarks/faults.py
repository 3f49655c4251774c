"""Faults injected into real federations: which were survived, rounds lost, rollbacks.

1. ``warmup``: an honest yolov8n federation from scratch; its ``best.pt`` is the starting model
   of the fault runs (a guard can only see a drop from a model that detects something). The
   fault runs use the same synthetic fleet, seed and partition, so their held-out set is the
   warm-up's held-out set too: the starting model never trained on it.
2. ``defaults``: every fault kind, with fedyolo's defaults (update hygiene on, drift guard on);
   the server is SIGKILLed after round ``--kill-after`` and resumed with ``resume=``.
3. ``guard-only``: the update-norm hygiene off, so scaled and random weights reach the
   aggregate and the drift guard alone must catch them (policy ``exclude``).

Counted from each run's ``metrics.jsonl``/``events.jsonl``: a fault is *survived* when its
round completed and the run went on; how it was handled (dropped before aggregation, rolled
back, or aggregated) and the round's mAP change are recorded with it; *rounds lost* = configured
rounds without a record; a rollback is *correct* when its round had a weight fault, *false*
otherwise. ClearML tracking is off in these runs (it does not touch the federation's path).

    .venv/bin/python benchmarks/faults.py
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from benchmarks_common import RESULTS, ROOT, WORK, fedyolo_cmd, fedyolo_run, machine

from deploy.local import kill_tree
from fl_server import run as fedyolo_api_run
from fl_server.run_dir import read_jsonl

FLEET = [
    "federation.clients=4",
    "data.partition=iid",
    "federation.round_timeout=120",
    "tracking.enabled=false",
]
WEIGHT_FAULTS = {"nan", "scaled_weights", "random_weights"}

# (client, round, kind): every kind once, in the run with fedyolo's defaults
DEFAULTS = [
    (1, 2, "crash"),
    (2, 3, "nan"),
    (3, 4, "scaled_weights"),
    (0, 5, "random_weights"),
    (1, 6, "hang"),
    (2, 7, "corrupt_labels"),
    (2, 8, "corrupt_labels"),
]
# weight faults only, with the update hygiene off: the drift guard is the defence
GUARD_ONLY = [(0, 3, "random_weights"), (3, 6, "scaled_weights")]
# slow poisoning: one client of four trains on corrupted labels from round 3 to the end, under
# guard.contribution (per-client leave-one-out scores each round) and policy exclude
SLOW_POISON = [(2, r, "corrupt_labels") for r in range(3, 10)]


def faults_override(faults: list[tuple[int, int, str]]) -> str:
    items = ", ".join(f"{{client: {c}, round: {r}, kind: {k}}}" for c, r, k in faults)
    return f"faults.more=[{items}]"


def run_killed_and_resumed(name: str, overrides: list[str], kill_after: int) -> Path:
    run = WORK / "runs" / name
    cmd = fedyolo_cmd(name, overrides)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "YOLO_OFFLINE": "1"})
    while len(read_jsonl(run / "metrics.jsonl")) < kill_after:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} ended before round {kill_after}")
        time.sleep(0.5)
    kill_tree(proc.pid)
    summary = fedyolo_api_run([f"resume={run}"])
    if not summary.ok:
        raise RuntimeError(f"{name}: the resumed run ended with status {summary.status}")
    return run


def replay_flags(run: Path, records: dict[int, dict]) -> list[tuple[int, int]] | None:
    """(round, client) flags of the guard's own rule (``Guard.contributions``) replayed on the
    run's kept per-image matches (``output.save_matches``); None for a run that kept none.
    Exclusion after a flag is not replayed: the client stays in, so rounds after a real
    exclusion are not what the run saw."""
    from fl_server.config import compose
    from fl_server.guard import Guard, replay_contributions

    if not (run / "eval").is_dir():
        return None
    scores = replay_contributions(Guard(compose([]).guard), run / "eval", list(records.values()))
    return [
        (r, int(k)) for r in sorted(scores) for k, v in sorted(scores[r].items()) if v["flagged"]
    ]


def tally(run: Path, faults: list[tuple[int, int, str]], rounds: int) -> dict:
    records = {r["round"]: r for r in read_jsonl(run / "metrics.jsonl")}
    events = read_jsonl(run / "events.jsonl")
    rollbacks = sorted(r for r, rec in records.items() if rec["guard"]["rolled_back"])
    weight_rounds = {r for _, r, k in faults if k in WEIGHT_FAULTS}
    per_fault = []
    for client, rnd, kind in faults:
        rec = records.get(rnd)
        dropped = [
            e["kind"]
            for e in events
            if e["round"] == rnd
            and e.get("client") in (client, f"node-{client}")
            and e["kind"] in ("client_failed", "update_rejected")
        ]
        if kind == "hang":  # a hung client is known by its node id until it answers
            dropped += [
                e["kind"] for e in events if e["round"] == rnd and e["kind"] == "client_failed"
            ]
        handled = (
            "dropped: " + dropped[0]
            if dropped
            else "rolled back"
            if rnd in rollbacks
            else "aggregated"
        )
        before = [
            r
            for r in records.values()
            if r["round"] < rnd
            and not r["guard"]["rolled_back"]
            and not r["guard"].get("probation")
        ]
        per_fault.append(
            {
                "client": client,
                "round": rnd,
                "kind": kind,
                "handled": handled,
                "round_completed": rec is not None,
                "survived": rec is not None,
                "map50_95": rec["map50_95"] if rec else None,
                "map50_95_before": before[-1]["map50_95"] if before else None,
            }
        )
    summary = json.loads((run / "summary.json").read_text())
    poisoned = {c for c, _, k in faults if k == "corrupt_labels"} | {
        c for c, _, k in faults if k in WEIGHT_FAULTS
    }
    flags = [(e["round"], int(e["client"])) for e in events if e["kind"] == "client_flagged"]
    replayed = replay_flags(run, records)
    contribution = [
        r["contribution_seconds"] for r in records.values() if r.get("contribution_seconds")
    ]
    return {
        "run": run.name,
        "status": summary["status"],
        "faults_injected": len(faults),
        "faults_survived": sum(f["survived"] for f in per_fault),
        "rounds_lost": rounds - len(records),
        "rollbacks": rollbacks,
        "rollbacks_correct": [r for r in rollbacks if r in weight_rounds],
        "false_triggers": [r for r in rollbacks if r not in weight_rounds],
        "resumes": sum(e["kind"] == "resume" for e in events),
        "drops_within_noise": [e["round"] for e in events if e["kind"] == "drop_within_noise"],
        "drops_on_probation": [e["round"] for e in events if e["kind"] == "drop_on_probation"],
        "flags": flags,
        "honest_flags": [f for f in flags if f[1] not in poisoned],
        # today's flag rule (fl_server.guard.Guard.contributions) on the run's kept matches: the
        # decisions a run with it would take on these models, up to a real exclusion
        "flags_replayed": replayed,
        "honest_flags_replayed": (
            None if replayed is None else [f for f in replayed if f[1] not in poisoned]
        ),
        "contribution_seconds_per_round": (
            sum(contribution) / len(contribution) if contribution else None
        ),
        "round_seconds_mean": sum(r["round_seconds"] for r in records.values())
        / max(1, len(records)),
        "best": summary["best"],
        "final": summary["final"],
        "curve_map50_95": [records[r]["map50_95"] for r in sorted(records)],
        "faults": per_fault,
    }


CONTRIBUTION = [
    "guard.contribution=true",
    "guard.policy=exclude",
    "output.save_matches=true",  # every rule can be replayed exactly on these runs
]


def contribution_runs(rounds: int, extra_overrides: list[str], label: str = "") -> None:
    """``faults-slow-poison`` and ``faults-honest`` (the same fleet and start, nothing
    injected) under guard.contribution; their rows in ``faults.json`` are replaced (with a
    ``label``, rows of their own: ``faults-slow-poison-<label>``, run with
    ``extra_overrides``)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    path = RESULTS / "faults.json"
    out = json.loads(path.read_text())
    warm = WORK / "runs" / "faults-warmup"
    start = [*FLEET, f"model.cfg={warm / 'best.pt'}", f"federation.rounds={rounds}"]
    for name, faults in (("faults-slow-poison", SLOW_POISON), ("faults-honest", [])):
        t1 = time.perf_counter()
        extra = [faults_override(faults)] if faults else []
        name = f"{name}-{label}" if label else name
        run = fedyolo_run(name, [*start, *extra, *CONTRIBUTION, *extra_overrides])
        row = {**tally(run, faults, rounds), "seconds": time.perf_counter() - t1}
        row["date"] = time.strftime("%Y-%m-%d")
        out["rows"] = [r for r in out["rows"] if r["run"] != name] + [row]
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps({k: row[k] for k in ("run", "flags", "flags_replayed")}), flush=True)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup-rounds", type=int, default=8)
    ap.add_argument("--warmup-epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--kill-after", type=int, default=4)
    ap.add_argument(
        "--tally-only", action="store_true", help="recount the existing runs' files only"
    )
    ap.add_argument(
        "--contribution-only",
        action="store_true",
        help="from the existing warm-up: re-run slow poisoning and its honest twin (same fleet, "
        "no fault) under guard.contribution, keeping every evaluation's per-image matches",
    )
    ap.add_argument(
        "--label",
        default="",
        help="with --contribution-only: rows of their own (faults-slow-poison-<label>)",
    )
    ap.add_argument("--extra", nargs="*", default=[], help="more fedyolo overrides (with --label)")
    args = ap.parse_args()
    if args.extra and not args.label:
        ap.error("--extra needs a --label: its rows must not pass for the default's")
    if args.contribution_only:
        contribution_runs(args.rounds, args.extra, args.label)
        return
    if args.tally_only:
        out = json.loads((RESULTS / "faults.json").read_text())
        runs = {
            "faults-defaults": DEFAULTS,
            "faults-guard-only": GUARD_ONLY,
            "faults-slow-poison": SLOW_POISON,
            "faults-honest": [],
        }
        for row in out["rows"]:
            base = max((k for k in runs if row["run"].startswith(k)), key=len)
            row.update(tally(WORK / "runs" / row["run"], runs[base], args.rounds))
        (RESULTS / "faults.json").write_text(json.dumps(out, indent=2) + "\n")
        return
    os.environ.setdefault("YOLO_OFFLINE", "1")
    out = {
        "benchmark": "faults",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "setup": {
            "model": "yolov8n.yaml, warm-started from the warm-up run's best.pt",
            "fleet": FLEET,
            "rounds": args.rounds,
            "local_epochs": 1,
            "images": 640,
            "imgsz": 128,
        },
        "rows": [],
    }
    t0 = time.perf_counter()
    warm = fedyolo_run(
        "faults-warmup",
        [
            *FLEET,
            f"federation.rounds={args.warmup_rounds}",
            f"train.epochs={args.warmup_epochs}",
        ],
    )
    out["warmup"] = tally(warm, [], args.warmup_rounds)
    start = [*FLEET, f"model.cfg={warm / 'best.pt'}", f"federation.rounds={args.rounds}"]
    t1 = time.perf_counter()
    run = run_killed_and_resumed(
        "faults-defaults", [*start, faults_override(DEFAULTS)], args.kill_after
    )
    out["rows"].append({**tally(run, DEFAULTS, args.rounds), "seconds": time.perf_counter() - t1})
    t1 = time.perf_counter()
    run = fedyolo_run(
        "faults-guard-only",
        [
            *start,
            faults_override(GUARD_ONLY),
            "aggregation.max_update_ratio=null",
            "aggregation.max_step_norm_x_median=null",
            "guard.policy=exclude",
        ],
    )
    out["rows"].append({**tally(run, GUARD_ONLY, args.rounds), "seconds": time.perf_counter() - t1})
    t1 = time.perf_counter()
    out["seconds"] = time.perf_counter() - t0
    (RESULTS / "faults.json").write_text(json.dumps(out, indent=2) + "\n")
    contribution_runs(args.rounds)
    print(json.dumps({r["run"]: {k: r[k] for k in list(r)[:9]} for r in out["rows"]}, indent=1))


if __name__ == "__main__":
    main()
