"""Client cold start: process start to the first training batch, in fresh processes.

Each sample is a new Python process that does what a ClientApp does on its first message:
import the ClientApp, build the model, load the received weights, build Ultralytics' trainer
and data pipeline, and reach the first batch. Writes ``benchmarks/results/cold_start.json``.

    .venv/bin/python benchmarks/cold_start.py --samples 3
    .venv/bin/python benchmarks/cold_start.py --samples 3 --image fedyolo-client:0.1.0
    .venv/bin/python benchmarks/cold_start.py --samples 3 --out cold_start_avx2.json

``--image`` runs the same probe inside the client image as well (its Python, its packages;
the shard mounted read-only), the way a fresh client container starts.
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
factory = T.local_trainer_class  # fl_client.ultralytics_adapter's, as fl_client.train calls it
def probe_class():
    class Probe(factory()):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            def first_batch(trainer):
                mark("first_batch")
                raise Ready
            self.add_callback("on_train_batch_start", first_batch)
    return Probe
T.local_trainer_class = probe_class
try:
    T.train_round(model, sys.argv[1], sys.argv[3], epochs=1, imgsz=int(sys.argv[4]), batch=16,
                  lr0=0.01, optimizer="SGD", momentum=0.9, weight_decay=5e-4, mosaic=0.0,
                  device="cpu", amp=False, workers=0, seed=0)
except Ready:
    pass
print(json.dumps(marks))
"""


def _container_cmd(image: str, work: Path, i: int) -> list[str]:
    """The probe inside the client image (its own Python and packages), the shard mounted
    read-only at the same path, a tmpfs for the round's folder."""
    probe = work / "probe.py"
    probe.write_text(PROBE)
    for path in (work, *work.rglob("*")):  # the image's user is not root
        path.chmod(0o755 if path.is_dir() else 0o644)
    return [
        "docker", "run", "--rm", "--entrypoint", "python",
        "-e", "YOLO_OFFLINE=1", "-e", "OMP_NUM_THREADS=1",
        "-v", f"{work}:{work}:ro", "--tmpfs", "/work:exec,mode=1777",
        image, str(probe), str(work / "data" / "data.yaml"), "{model}", f"/work/w{i}", "{imgsz}",
    ]  # fmt: skip


def _samples(args, work: Path, data: Path, image: str | None) -> list[dict]:
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    samples = []
    for i in range(args.samples + 1):  # the first run warms the OS page cache; not reported
        if image:
            cmd = [
                c.format(model=args.model, imgsz=args.imgsz) for c in _container_cmd(image, work, i)
            ]
        else:
            cmd = [sys.executable, "-c", PROBE, str(data), args.model, str(work / f"w{i}")]
            cmd.append(str(args.imgsz))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        marks = json.loads(out.stdout.strip().splitlines()[-1])
        if i:
            samples.append(marks)
            print(image or "host", marks, flush=True)
    return samples


KEYS = ["interpreter", "imports", "model", "first_batch"]


def _median(samples: list[dict]) -> dict:
    return {k: sorted(s[k] for s in samples)[len(samples) // 2] for k in KEYS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--model", default="yolov8n.yaml")
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--image", help="also in this client image (e.g. fedyolo-client:0.1.0)")
    ap.add_argument(
        "--out",
        default="cold_start.json",
        help="the results file (another machine's: e.g. cold_start_avx2.json)",
    )
    args = ap.parse_args()
    from benchmarks_common import machine

    from fl_server.data import generate

    work = Path(tempfile.mkdtemp(prefix="fedyolo-cold-"))
    data = generate(work / "data", 256, imgsz=args.imgsz, seed=0, domains=["day", "night"])
    samples = _samples(args, work, data, None)
    result = {
        "benchmark": "cold_start",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "imgsz": args.imgsz,
        "shard_images": 256,
        "what": "seconds from process creation to each mark; first_batch = ready to train",
        "median_seconds": _median(samples),
        "samples": samples,
        "target_seconds": 5.0,
    }
    if args.image:
        inside = _samples(args, work, data, args.image)
        revision = subprocess.run(
            ["docker", "image", "inspect", args.image, "--format",
             '{{index .Config.Labels "org.opencontainers.image.revision"}}'],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        result["container"] = {
            "image": args.image,
            "revision": revision,
            "median_seconds": _median(inside),
            "samples": inside,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
