"""How a round's cost grows with the fleet (issue 32): simulation fleets of 10, 30 and 100
clients with 10 sampled per round, the deployment engine with 8 SuperNodes, and
``guard.contribution`` at 10 and 30 sampled clients.

Runs the real ``fedyolo run`` for each setup, each in a fresh process
(``benchmarks_common.fedyolo_cmd``: in the simulation engine the server lives in that process,
so its memory is the run's own, not what earlier setups left) and reads what every run records
in its round records (``metrics.jsonl``): ``round_seconds``,
``aggregate_seconds``, ``server_rss_mb``, ``contribution_seconds`` and each client's ``rss_mb``
and bytes. Medians are over rounds 2..n (round 1 holds the warm-up: actors, imports, first
model build) when there are 3 rounds or more, else over all rounds.

Every fleet keeps ``IMAGES_PER_CLIENT`` synthetic images per client (5 train + 1 val) and a
held-out set of ``SERVER_VAL`` images whatever its size (``data.server_val_fraction`` is set to
``SERVER_VAL / images``), so a sampled client does the same work and the server's evaluation
costs the same at 10 and 100 clients: a round at 100 against one at 10 is the fleet's own cost.
Flower samples ``int(connected * fraction)`` nodes, so ``federation.fraction`` is
``(sampled + 0.5) / clients`` (1.0 when all are sampled): exactly ``sampled`` each round.

While a run goes, a thread samples the run's process tree every ``SAMPLE_SECONDS`` with
psutil: the sum of its processes' RSS (``tree_rss_mb_max``; shared pages counted per process)
and, for the deployment engine, each SuperNode's processes (the SuperNode, its SuperExec and
``flwr-clientapp`` processes, and its warm worker, found by the SuperExec pid it watches or,
the spare the launcher started with the node, by the node name its command names): the
sum of their RSS and of their PSS (shared pages counted once across the machine) per node, the
maximum over the run (``nodes``).

Writes ``benchmarks/results/scale.json`` (rows of setups not run this time are kept) and
``benchmarks/results/scale.png``; ``targets`` are computed from the rows. ``--quick`` (2
rounds, a smoke test) writes ``benchmarks/work/scale_quick.json`` and ``.png`` instead. A run
that does not end within ``--setup-timeout`` seconds is killed (its row says so): the one smoke
run so far (2026-12-04, ``--quick --setups sim-10``) hung in round 1, Ray's raylet never
started and a forked child sat in ClearML's at-fork hook on an import lock (the hazard
``fl_server.clearml_adapter.no_reporting_in_forked_children`` is meant to close; the simulation
engine may start Ray while ``Task.init`` runs in the ServerApp's thread).

    .venv/bin/python benchmarks/scale.py                       # every setup, 10 rounds
    .venv/bin/python benchmarks/scale.py --setups sim-10,sim-100 --rounds 10
    .venv/bin/python benchmarks/scale.py --quick --setups sim-10   # smoke: 2 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import yaml
from benchmarks_common import RESULTS, ROOT, WORK, fedyolo_cmd, machine

from deploy.local import kill_tree

IMAGES_PER_CLIENT = 6  # 5 train + 1 val (data.client_val_fraction=0.1 keeps >= 1 for val)
SERVER_VAL = 48  # held-out images, whatever the fleet
SAMPLE_SECONDS = 1.0
TINY = [  # the tiny model at 64 px (fl_client/models/fedyolo-tiny.yaml): fleet rows
    "model=tiny",
    "data.synth.imgsz=64",
    "train.imgsz=64",
    "train.batch=8",
    "train.eval_batch=16",
]
CONTRIBUTION = ["guard.contribution=true"]
YOLOV8N_640 = (  # what users train: yolov8n at 640 px (the 640 row, issue 32 item 4)
    "model=yolov8n",
    "data.synth.imgsz=640",
    "train.imgsz=640",
    "train.batch=8",
    "train.eval_batch=8",
)


@dataclass(frozen=True)
class Setup:
    engine: str
    clients: int
    sampled: int
    contribution: bool = False
    extra: tuple[str, ...] = ()  # more overrides (the full leave-one-out rows)
    model: tuple[str, ...] = tuple(TINY)  # the model and its resolution
    images_per_client: int = IMAGES_PER_CLIENT
    rounds: int | None = None  # this setup's own, instead of --rounds

    @property
    def fraction(self) -> float:
        """``federation.fraction`` that makes Flower sample exactly ``sampled`` clients."""
        return 1.0 if self.sampled >= self.clients else (self.sampled + 0.5) / self.clients


SETUPS = {
    "sim-10": Setup("simulation", 10, 10),
    "sim-30": Setup("simulation", 30, 10),
    "sim-100": Setup("simulation", 100, 10),
    "deploy-8": Setup("local-deployment", 8, 8),
    "contrib-10": Setup("simulation", 10, 10, contribution=True),
    "contrib-30": Setup("simulation", 30, 30, contribution=True),
    # every client scored (guard.contribution_sample=0): the cost before the sample, for scale
    "contrib-10-full": Setup("simulation", 10, 10, True, ("guard.contribution_sample=0",)),
    "contrib-30-full": Setup("simulation", 30, 30, True, ("guard.contribution_sample=0",)),
    # yolov8n at 640 px, 2 clients: the per-round costs at the resolution users train at
    "sim-640": Setup("simulation", 2, 2, model=YOLOV8N_640, images_per_client=25, rounds=3),
    # the fleet rows with q4z both ways: a sampled client often missed rounds (steps or whole)
    "sim-100-q4z": Setup("simulation", 100, 10, extra=("transport=q4z",)),
    # the fleet rows with each client's optimiser momentum kept across rounds (its own state)
    "sim-100-km": Setup("simulation", 100, 10, extra=("train.keep_momentum=true",), rounds=30),
}
FLEET_ROWS = ("sim-10", "sim-30", "sim-100")  # the same setup but the fleet's size
TARGETS = {
    "server_rss_flat": "server RSS last/first <= 1.10 in every simulation fleet row (sim-N)",
    "round_100_vs_10": "round_seconds_median of sim-100 <= 1.3 x sim-10's (10 sampled in both)",
    "contribution_30_vs_10": "contribution_seconds_median of contrib-30 <= 1.5 x contrib-10's",
    "deploy_8_completes": "deploy-8 (8 SuperNodes, local-deployment) completes",
}


def overrides(setup: Setup, rounds: int) -> list[str]:
    images = SERVER_VAL + setup.images_per_client * setup.clients
    return [
        f"engine={setup.engine}",
        *setup.model,
        f"federation.clients={setup.clients}",
        f"federation.fraction={setup.fraction:.6f}",
        f"federation.rounds={rounds}",
        "data.partition=iid",
        f"data.synth.images={images}",
        f"data.server_val_fraction={SERVER_VAL / images:.6f}",
        *(CONTRIBUTION if setup.contribution else []),
        *setup.extra,
    ]


# -- memory while a run goes -----------------------------------------------------------------
class TreeSampler(threading.Thread):
    """Samples this process's tree (and the warm workers, which may outlive the process that
    started them and be re-parented) until ``stop()``."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process()
        self.done = threading.Event()
        self.tree_rss_max = 0.0
        self.available_min = float("inf")
        self.nodes: dict[str, dict] = {}
        self.samples = 0

    def run(self) -> None:
        while not self.done.is_set():
            # a process that ends mid-sample: the next sample sees the tree as it is
            with contextlib.suppress(psutil.Error):
                self._sample()
            self.done.wait(SAMPLE_SECONDS)

    def stop(self) -> dict:
        self.done.set()
        self.join(timeout=10)
        return {
            "samples": self.samples,
            "tree_rss_mb_max": round(self.tree_rss_max, 1),
            "machine_available_mb_min": (
                None if self.available_min == float("inf") else round(self.available_min, 1)
            ),
            "nodes": self.nodes or None,
        }

    def _sample(self) -> None:
        tree = self.root.children(recursive=True)  # the run, not this benchmark's process
        self.tree_rss_max = max(self.tree_rss_max, sum(_rss(p) for p in tree))
        self.available_min = min(self.available_min, psutil.virtual_memory().available / 2**20)
        self.samples += 1
        found = {p.pid: p for p in tree if "flower-supernode" in _cmd(p)}
        supernodes = [p for p in found.values() if p.ppid() not in found]  # not their children
        if not supernodes:
            return
        workers = [p for p in psutil.process_iter() if "fl_client.worker" in _cmd(p)]
        for node in supernodes:
            procs = [node, *node.children(recursive=True)]
            pids = {p.pid for p in procs}
            # its warm worker: the one it started, or its spare (labelled with the node's name)
            label = _partition(node)
            mine = [
                w
                for w in workers
                if (_watched(w) in pids or _spare_of(w) == label) and w.pid not in pids
            ]
            rss = {p.pid: _rss(p) for p in procs + mine}
            entry = self.nodes.setdefault(
                _partition(node),
                {"rss_mb_max": 0.0, "pss_mb_max": 0.0, "supernode_rss_mb_max": 0.0,
                 "worker_rss_mb_max": 0.0, "processes_max": 0},
            )  # fmt: skip
            entry["rss_mb_max"] = max(entry["rss_mb_max"], round(sum(rss.values()), 1))
            entry["pss_mb_max"] = max(entry["pss_mb_max"], round(sum(map(_pss, procs + mine)), 1))
            entry["supernode_rss_mb_max"] = max(
                entry["supernode_rss_mb_max"], round(rss[node.pid], 1)
            )
            worker = max([rss[w.pid] for w in mine] + [0.0])
            entry["worker_rss_mb_max"] = max(entry["worker_rss_mb_max"], round(worker, 1))
            entry["processes_max"] = max(entry["processes_max"], len(rss))


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _rss(p: psutil.Process) -> float:
    try:
        return p.memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def _pss(p: psutil.Process) -> float:
    try:
        return p.memory_full_info().pss / 2**20
    except (psutil.Error, AttributeError):
        return _rss(p)


def _partition(p: psutil.Process) -> str:
    m = re.search(r"partition-id=(\d+)", _cmd(p))
    return f"node-{m.group(1)}" if m else f"pid-{p.pid}"


def _spare_of(p: psutil.Process) -> str | None:
    """The node a local deployment's spare worker was started for (``--node supernode-i``)."""
    m = re.search(r"--node supernode-(\d+)", _cmd(p))
    return f"node-{m.group(1)}" if m else None


def _watched(p: psutil.Process) -> int | None:
    m = re.search(r"--watch-pid (\d+)", _cmd(p))
    return int(m.group(1)) if m else None


# -- a run's row -----------------------------------------------------------------------------
def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def row(name: str, setup: Setup, run_dir: Path, rounds: int, memory: dict) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())["data"]
    config = (run_dir / "config.yaml").read_text()
    steady = records[1:] if len(records) >= 3 else records

    def med(key: str) -> float | None:
        return _median([r.get(key) for r in steady])

    cfg = yaml.safe_load(config)
    train = [c["train_images"] for c in manifest["clients"]]
    nodes = memory.get("nodes") or {}
    rss = [r.get("server_rss_mb") for r in records]
    entries = [c for r in records for c in r["clients"] + r.get("client_eval", [])]
    clients_rss = [c["rss_mb"] for c in entries if c.get("rss_mb") is not None]
    return {
        "setup": name,
        "engine": setup.engine,
        "clients": setup.clients,
        "sampled_per_round": setup.sampled,
        "fraction": setup.fraction,
        # train replies aggregated per round (sampled minus failed or rejected)
        "aggregated_per_round": sorted({len(r["clients"]) for r in records}),
        "failures": sum(r["failures"] for r in records),
        "rounds": rounds,
        "rounds_completed": len(records),
        "status": summary.get("status"),
        "round_seconds_median": med("round_seconds"),
        "round_seconds_first": records[0]["round_seconds"] if records else None,
        "aggregate_seconds_median": med("aggregate_seconds"),
        "eval_seconds_median": med("eval_seconds"),
        "client_train_seconds_median": _median(
            [c.get("train_seconds") for r in steady for c in r["clients"]]
        ),
        "transport_seconds_median": med("transport_seconds"),
        "contribution_seconds_median": med("contribution_seconds") if setup.contribution else None,
        "server_rss_mb_first": rss[0] if rss else None,
        "server_rss_mb_last": rss[-1] if rss else None,
        "server_rss_mb_per_round": rss,
        "client_rss_mb_max": max(clients_rss) if clients_rss else None,
        "bytes_up_per_round": _median([sum(c["bytes_up"] for c in r["clients"]) for r in steady]),
        "bytes_down_per_round": _median(
            [sum(c["bytes_down"] for c in r["clients"]) for r in steady]
        ),
        "node_rss_mb_max": max((n["rss_mb_max"] for n in nodes.values()), default=None),
        "node_pss_mb_max": max((n["pss_mb_max"] for n in nodes.values()), default=None),
        "model": cfg["model"]["cfg"],
        "imgsz": cfg["train"]["imgsz"],
        "images_per_client": setup.images_per_client,
        "train_images_per_client": [min(train), max(train)] if train else None,
        "server_val_images": manifest.get("server_val_images"),
        "final_map50_95": (summary.get("final") or {}).get("map50_95"),
        "memory": memory,
        "config": config,
    }


def run_setup(name: str, setup: Setup, rounds: int, extra: list[str], limit: float) -> dict:
    run_dir = WORK / "runs" / f"scale-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)  # no earlier run's records read as this one's
    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        fedyolo_cmd(run_dir.name, [*overrides(setup, rounds), *extra]), cwd=ROOT
    )
    try:
        code = proc.wait(timeout=limit)
        error = f"fedyolo run exited with {code}" if code else None
    except subprocess.TimeoutExpired:  # a hung run (e.g. a deadlocked fork) must not hang this
        kill_tree(proc.pid)
        error = f"no end within --setup-timeout {limit:.0f} s: killed"
    finally:
        memory = sampler.stop()
    wall = time.perf_counter() - t0
    if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "summary.json").is_file():
        return {"setup": name, **asdict(setup), "status": "failed", "error": error}
    out = row(name, setup, run_dir, rounds, memory)
    if error and out["status"] == "running":
        out["status"] = "killed"  # its summary.json was left as a live run's
    out.update(date=time.strftime("%Y-%m-%d"), wall_seconds=round(wall, 1), extra=extra)
    if error:
        out["error"] = error
    return out


# -- targets, from the rows ------------------------------------------------------------------
def _ok(rows: dict, name: str) -> dict | None:
    r = rows.get(name)
    return r if r and r.get("status") == "completed" else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _verdict(value: float | None, limit: float, why: str = "") -> dict:
    if value is None:
        return {"value": None, "limit": limit, "pass": None, "note": why or "not measured"}
    return {"value": value, "limit": limit, "pass": value <= limit}


def targets(rows: dict) -> dict:
    out = {}
    ratios = {}
    for name in FLEET_ROWS:
        if (r := _ok(rows, name)) is not None:
            ratios[name] = _ratio(r["server_rss_mb_last"], r["server_rss_mb_first"])
    worst = max((v for v in ratios.values() if v is not None), default=None)
    out["server_rss_flat"] = {**_verdict(worst, 1.10), "per_row": ratios}
    small, big = _ok(rows, "sim-10"), _ok(rows, "sim-100")
    same = small and big and small["sampled_per_round"] == big["sampled_per_round"]
    out["round_100_vs_10"] = _verdict(
        _ratio(big["round_seconds_median"], small["round_seconds_median"]) if same else None,
        1.3,
        "" if same else "needs completed sim-10 and sim-100 rows with the same sample",
    )
    c10, c30 = _ok(rows, "contrib-10"), _ok(rows, "contrib-30")
    out["contribution_30_vs_10"] = _verdict(
        _ratio(c30["contribution_seconds_median"], c10["contribution_seconds_median"])
        if c10 and c30
        else None,
        1.5,
        "" if c10 and c30 else "needs completed contrib-10 and contrib-30 rows",
    )
    deploy = rows.get("deploy-8")
    out["deploy_8_completes"] = {
        "value": deploy.get("status") if deploy else None,
        "pass": None if deploy is None else deploy.get("status") == "completed",
    }
    for key, text in TARGETS.items():
        out[key] = {"target": text, **out[key]}
    return out


# -- the plot --------------------------------------------------------------------------------
def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    sim = sorted(
        (r for n, r in rows.items() if n in FLEET_ROWS and r.get("round_seconds_median")),
        key=lambda r: r["clients"],
    )
    fleet = [r["clients"] for r in sim]
    axes[0].plot(fleet, [r["round_seconds_median"] for r in sim], "o-", label="round")
    axes[0].plot(fleet, [r["aggregate_seconds_median"] for r in sim], "s--", label="aggregation")
    axes[0].set(xlabel="clients in the fleet (10 sampled)", ylabel="seconds (median)")
    axes[0].set_title("round time vs fleet size")
    axes[1].plot(fleet, [r["server_rss_mb_first"] for r in sim], "o-", label="after round 1")
    axes[1].plot(fleet, [r["server_rss_mb_last"] for r in sim], "s--", label="after the last")
    axes[1].set(xlabel="clients in the fleet (10 sampled)", ylabel="server RSS (MiB)")
    axes[1].set_title("server memory vs fleet size")
    for suffix, style, label in (("", "o-", "sampled (default)"), ("-full", "s--", "every client")):
        contrib = sorted(
            (
                r
                for n, r in rows.items()
                if re.fullmatch(rf"contrib-\d+{suffix}", n) and r.get("status") == "completed"
            ),
            key=lambda r: r["sampled_per_round"],
        )
        axes[2].plot(
            [r["sampled_per_round"] for r in contrib],
            [r["contribution_seconds_median"] for r in contrib],
            style,
            label=label,
        )
    axes[2].legend(fontsize=7)
    axes[2].set(xlabel="clients sampled per round", ylabel="seconds per round (median)")
    axes[2].set_title("guard.contribution scoring")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"of {', '.join(SETUPS)}")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the simulation setups")
    ap.add_argument("--deploy-rounds", type=int, default=3, help="rounds of deploy-8")
    ap.add_argument("--quick", action="store_true", help="2 rounds each, into benchmarks/work")
    ap.add_argument("--extra", nargs="*", default=[], help="more fedyolo overrides")
    ap.add_argument(
        "--setup-timeout", type=float, default=3600, help="seconds before a setup's run is killed"
    )
    args = ap.parse_args()
    names = [s for s in args.setups.split(",") if s]
    unknown = [s for s in names if s not in SETUPS]
    if unknown:
        ap.error(f"--setups: unknown {unknown}; choose from {list(SETUPS)}")
    if args.quick:
        args.rounds = args.deploy_rounds = 2
    os.environ.setdefault("YOLO_OFFLINE", "1")
    folder = WORK if args.quick else RESULTS
    path = folder / ("scale_quick.json" if args.quick else "scale.json")
    old = json.loads(path.read_text()) if path.is_file() else {}
    rows = {r["setup"]: r for r in old.get("rows", []) if r.get("setup") in SETUPS}
    for name in names:
        setup = SETUPS[name]
        rounds = args.deploy_rounds if setup.engine != "simulation" else args.rounds
        rounds = setup.rounds or rounds
        print(f"{name}: {setup} {rounds} rounds ...", flush=True)
        rows[name] = run_setup(name, setup, rounds, args.extra, args.setup_timeout)
        if args.quick:
            rows[name]["quick"] = True
        brief = {k: v for k, v in rows[name].items() if k not in ("config", "memory")}
        brief.pop("server_rss_mb_per_round", None)
        print(name, json.dumps(brief), flush=True)
        out = {
            "benchmark": "scale",
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
            "rows": [rows[n] for n in SETUPS if n in rows],
            "targets": targets(rows),
            "target_text": TARGETS,
        }
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")  # after each setup: none is lost
        plot(rows, path.with_suffix(".png"))
    print(json.dumps(targets(rows), indent=2))


if __name__ == "__main__":
    main()
