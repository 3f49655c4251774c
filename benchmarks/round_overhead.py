"""Where a round's wall time goes: client training vs everything else, on both engines.

Runs the real ``fedyolo run`` on each engine and splits every round's wall time (server's view:
from the end of one round's evaluation to the end of the next) into

* ``training``: the slowest client's time inside Ultralytics' epoch loop (loading batches,
  forward, backward, optimiser step): the clients run in parallel, so the slowest one is on
  the critical path;
* ``everything else``: process start-up and imports, trainer set-up, weight (de)serialisation,
  transport, aggregation and the server's evaluation. ``eval_seconds`` and the slowest client's
  ``setup_seconds`` are reported separately. With ``federation.overlap_eval`` (the default) the
  server's evaluation of round r runs while round r+1's clients train, so only what of it
  outlasts their training is in a round's time; ``simulation-sequential`` turns it off.

A round's time is its record's ``round_seconds``: from the previous round's record to its own,
so the rounds' times add up to the run's.

Setups: ``simulation``, ``local-deployment`` and ``compose`` as configured by default (the
deployment engines hand each message to the SuperNode's warm worker, ``fl_client.worker``), and
``local-deployment-cold`` (``engine.warm_worker=false``: every message's work in its own new
``flwr-clientapp`` process, as before the warm worker). ``compose`` needs a Docker engine and
the images (``make images``).

Writes ``benchmarks/results/round_overhead.json`` (setups not run this time are kept).

    .venv/bin/python benchmarks/round_overhead.py --rounds 6 --deploy-rounds 4 \
        --setups simulation,simulation-sequential,local-deployment,local-deployment-cold,compose

Other Flower builds, for what Flower's own per-message costs are (``--label`` keeps each apart;
every entry records the ``flwr`` it ran and the poll settings in its environment): Flower 1.42,
and Flower with the upstream change proposed in ``benchmarks/upstream/`` (the SuperNode's 3 s
idle pull and 0.5 s reply poll as settings), each installed under ``benchmarks/work/flwr/``
(``benchmarks/upstream/README.md`` has the commands) and put first on ``PYTHONPATH``; every
Flower process of the run inherits it. Nothing of this reaches fedyolo's own installation.

    PYTHONPATH=benchmarks/work/flwr/1.42.0 .venv/bin/python benchmarks/round_overhead.py \
        --setups local-deployment --deploy-rounds 4 --label flwr-1.42.0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import yaml
from benchmarks_common import RESULTS, WORK, fedyolo_run, machine

from fl_server.run_dir import RunDir

SETUPS = {
    "simulation": ["engine=simulation"],
    # the server's evaluation after the round, before the next round's training (as before
    # federation.overlap_eval): what the overlap hides
    "simulation-sequential": ["engine=simulation", "federation.overlap_eval=false"],
    "local-deployment": ["engine=local-deployment"],
    "local-deployment-cold": ["engine=local-deployment", "engine.warm_worker=false"],
    "compose": ["engine=compose"],
}


# The upstream settings proposed in benchmarks/upstream/ (the nodes inherit the environment;
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL is not here: the engines always set it to 0.1)
POLL_SETTINGS = ("FLWR_SUPERNODE_PULL_INTERVAL", "FLWR_SUPERNODE_REPLY_POLL_INTERVAL")


def run_name(setup: str, label: str = "") -> str:
    return f"overhead-{setup}" + (f"-{label}" if label else "")


def run(setup: str, rounds: int, extra: list[str], label: str = "") -> Path:
    return fedyolo_run(
        run_name(setup, label), [*SETUPS[setup], f"federation.rounds={rounds}", *extra]
    )


def split(run_dir: Path) -> dict:
    """Each round's time against the training on its critical path.

    A round's time runs from the previous round's record to its own. Sequentially that holds
    the round's own training; with ``federation.overlap_eval`` it holds the *next* round's
    (which ran during this round's evaluation), and the last round holds none: there the
    steady state is rounds 2..n-1, each paired with the training of the round after it."""
    records, events = RunDir(run_dir).rounds(), RunDir(run_dir).read_events()
    overlapped = any(e["kind"] == "run_start" and e.get("overlap_eval") for e in events)
    rows = []
    for i, r in enumerate(records):
        trained = records[i + 1] if overlapped and i + 1 < len(records) else r
        clients = trained["clients"] if trained is not r or not overlapped else []
        train = max((c["train_seconds"] for c in clients), default=0.0)
        rows.append(
            {
                "round": r["round"],
                "training_round": trained["round"] if clients else None,
                "round_seconds": r["round_seconds"],
                "training_seconds": train,
                "other_seconds": r["round_seconds"] - train,
                "other_share": 1 - train / r["round_seconds"],
                "eval_seconds": r["eval_seconds"],
                "client_setup_seconds": max((c["setup_seconds"] for c in clients), default=0.0),
                "client_handler_seconds": max((c["handler_seconds"] for c in clients), default=0.0),
                # per-message process: its creation to the handler (0 when the process lives on)
                "client_startup_seconds": max(
                    (c.get("startup_seconds", 0) for c in clients), default=0.0
                ),
            }
        )
    steady = rows[1:-1] if overlapped else rows[1:]
    steady = steady or rows

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
            "client_handler_seconds",
            "client_startup_seconds",
        )
    }
    summary["other_share"] = 1 - summary["training_seconds"] / summary["round_seconds"]
    return {
        "overlap_eval": overlapped,
        "steady_rounds": [steady[0]["round"], steady[-1]["round"]],
        "steady_state_rounds_2_to_n": summary,
        "round_1": rows[0],
        "last_round": rows[-1],
        "rounds": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--deploy-rounds", type=int, default=3)
    ap.add_argument(
        "--setups",
        default="simulation,simulation-sequential,local-deployment,local-deployment-cold",
    )
    ap.add_argument("--extra", nargs="*", default=[], help="more fedyolo overrides")
    ap.add_argument(
        "--label",
        default="",
        help="the results' key is <setup>@<label> (another Flower build, other settings)",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="split a setup's completed run in benchmarks/work instead of running it again",
    )
    args = ap.parse_args()
    if args.label and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,39}", args.label):
        ap.error(f"--label {args.label!r}: lower-case letters, digits, '.', '_' and '-'")
    path = RESULTS / "round_overhead.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    out = {
        "benchmark": "round_overhead",
        "engines": {k: v for k, v in old.get("engines", {}).items() if k.split("@")[0] in SETUPS},
    }
    for setup in args.setups.split(","):
        rounds = args.rounds if setup.startswith("simulation") else args.deploy_rounds
        key = f"{setup}@{args.label}" if args.label else setup
        run_dir = WORK / "runs" / run_name(setup, args.label)
        if not (args.reuse and _completed(run_dir, rounds)):
            run_dir = run(setup, rounds, args.extra, args.label)
        out["engines"][key] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),  # each entry's own: entries of other runs are kept
            "overrides": [*SETUPS[setup], *args.extra],
            "rounds": rounds,
            "flwr": version("flwr"),
            "environment": {k: os.environ[k] for k in POLL_SETTINGS if k in os.environ},
            "local_work": local_work(run_dir),
            **split(run_dir),
        }
        out["config"] = (run_dir / "config.yaml").read_text()
        print(key, json.dumps(out["engines"][key]["steady_state_rounds_2_to_n"]), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")  # after each setup: none is lost


def local_work(run_dir: Path) -> dict:
    """Each client's work per round in this run: local epochs and batch size (its config)."""
    train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    return {"epochs": int(train["epochs"]), "batch": int(train["batch"])}


def _completed(run_dir: Path, rounds: int) -> bool:
    """A finished run of this setup is already in benchmarks/work (``--reuse``)."""
    f = run_dir / "summary.json"
    if not f.is_file():
        return False
    summary = json.loads(f.read_text())
    return summary.get("status") == "completed" and summary.get("rounds_completed") == rounds


if __name__ == "__main__":
    main()
