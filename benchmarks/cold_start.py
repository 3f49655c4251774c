"""Client cold start: process start to the first training batch, in fresh processes.

Each sample is a new Python process that does what a ClientApp does on its first message:
import the ClientApp, build the model, load the received weights, build Ultralytics' trainer
and data pipeline, and reach the first batch. Writes ``benchmarks/results/cold_start.json``.

    .venv/bin/python benchmarks/cold_start.py --samples 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

PROBE = r"""
import json, os, sys, time
import psutil
t_proc = psutil.Process().create_time()
marks = {}
def mark(name): marks[name] = time.time() - t_proc
mark("interpreter")
import fl_client.client_app  # noqa: F401  (what flwr-clientapp loads)
from fl_client.model import build_model, load_record, to_record
from fl_client import train as T
mark("imports")
model = build_model(sys.argv[2], ["car", "pedestrian", "cyclist", "traffic_sign"])
load_record(model, to_record(model))
mark("model")
class Ready(Exception):
    pass
cls = T._local_trainer_class()
orig = cls.__init__
def init(self, *a, **k):
    orig(self, *a, **k)
    def first_batch(trainer):
        mark("first_batch")
        raise Ready
    self.add_callback("on_train_batch_start", first_batch)
cls.__init__ = init
T._TRAINER_CLASS = cls
try:
    T.train_round(model, sys.argv[1], sys.argv[3], epochs=1, imgsz=int(sys.argv[4]), batch=16,
                  lr0=0.01, optimizer="SGD", momentum=0.9, weight_decay=5e-4, mosaic=0.0,
                  device="cpu", amp=False, workers=0, seed=0)
except Ready:
    pass
print(json.dumps(marks))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--model", default="yolov8n.yaml")
    ap.add_argument("--imgsz", type=int, default=128)
    args = ap.parse_args()
    from benchmarks_common import machine

    from fl_server.data import generate

    work = Path(tempfile.mkdtemp(prefix="fedyolo-cold-"))
    data = generate(work / "data", 256, imgsz=args.imgsz, seed=0, domains=["day", "night"])
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    samples = []
    for i in range(args.samples + 1):  # the first run warms the OS page cache; not reported
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                PROBE,
                str(data),
                args.model,
                str(work / f"w{i}"),
                str(args.imgsz),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            check=True,
        )
        marks = json.loads(out.stdout.strip().splitlines()[-1])
        if i:
            samples.append(marks)
            print(marks, flush=True)
    keys = ["interpreter", "imports", "model", "first_batch"]
    median = {k: sorted(s[k] for s in samples)[len(samples) // 2] for k in keys}
    result = {
        "benchmark": "cold_start",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "imgsz": args.imgsz,
        "shard_images": 256,
        "what": "seconds from process creation to each mark; first_batch = ready to train",
        "median_seconds": median,
        "samples": samples,
        "target_seconds": 5.0,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cold_start.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(median))


if __name__ == "__main__":
    main()
