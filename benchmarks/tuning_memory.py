"""Does a tuning worker stay flat across trials, and does it leave processes behind?

Runs ``fedyolo tune`` (a real study, every trial a federation in the simulation engine, so Ray
starts and stops with each trial) as a subprocess and samples, every 0.25 s, the worker's RSS
and its descendant processes. From the journal's trial completion times it reports the worker's
RSS right after each trial and the descendants still alive then; after the worker exits, any Ray
process (``raylet``, ``gcs_server``, ``ray::``) started during the benchmark that is still
running counts as left behind.

Writes ``benchmarks/results/tuning_memory.json`` (``--out``). Whether growth is glibc's
allocator keeping freed memory rather than a leak: run it again with, e.g.,
``GLIBC_TUNABLES=glibc.malloc.trim_threshold=131072:glibc.malloc.arena_max=2``.

    .venv/bin/python benchmarks/tuning_memory.py --trials 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import psutil
from benchmarks_common import RESULTS, ROOT, WORK, machine

RAY_NAMES = ("raylet", "gcs_server", "ray::", "dashboard", "plasma")


def _sample(pid: int, out: list[dict], stop: threading.Event) -> None:
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            kids = proc.children(recursive=True)
            rss = proc.memory_info().rss
        except psutil.Error:
            return
        names = []
        for k in kids:
            try:
                names.append(" ".join(k.cmdline())[:80] or k.name())
            except psutil.Error:
                continue
        out.append({"t": time.time(), "rss_mb": rss / 2**20, "children": names})
        stop.wait(0.25)


def _ray_processes(since: float) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline", "create_time", "name"]):
        cmd = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
        if (p.info["create_time"] or 0) >= since and any(n in cmd for n in RAY_NAMES):
            found.append(cmd[:120])
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="tuning_memory.json")
    args = ap.parse_args()
    name = f"memory-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = WORK / "studies"
    base = [
        "federation.clients=2",
        f"federation.rounds={args.rounds}",
        "data.synth.images=160",
        "tracking.enabled=false",
        f"output.dir={out_dir}",
        f"tuning.study={name}",
        f"tuning.trials={args.trials}",
        "tuning.pruner=none",
    ]
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_server.cli", "tune", *base],
        cwd=ROOT,
        env={**os.environ, "YOLO_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples: list[dict] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(proc.pid, samples, stop), daemon=True)
    sampler.start()
    rc = proc.wait()
    stop.set()
    sampler.join()
    time.sleep(2)  # what is still running two seconds after the worker ended
    left = _ray_processes(t0)

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out_dir / name / "study.journal")))
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    after = []
    for t in trials:
        if t.datetime_complete is None:
            continue
        done = t.datetime_complete.timestamp()
        # the first sample at least 1 s after the trial ended (its federation torn down)
        s = next((s for s in samples if s["t"] >= done + 1.0), None)
        if s is not None:
            after.append(
                {
                    "trial": t.number,
                    "state": t.state.name,
                    "worker_rss_mb": round(s["rss_mb"], 1),
                    "children": s["children"],
                }
            )
    result = {
        "benchmark": "tuning_memory",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "setup": {
            "overrides": base,
            "trials": args.trials,
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
        },
        "exit_code": rc,
        "after_each_trial": after,
        "peak_worker_rss_mb": round(max(s["rss_mb"] for s in samples), 1) if samples else None,
        "ray_processes_left": left,
        "seconds": round(time.time() - t0, 1),
    }
    if len(after) >= 2:
        result["rss_growth_first_to_last_mb"] = round(
            after[-1]["worker_rss_mb"] - after[0]["worker_rss_mb"], 1
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "after_each_trial"}, indent=1))
    for a in after:
        print(a["trial"], a["state"], a["worker_rss_mb"], len(a["children"]))


if __name__ == "__main__":
    main()
