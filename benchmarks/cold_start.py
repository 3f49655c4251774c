"""Client cold start: process start to the first training batch, in fresh processes.

Each sample is a new Python process that does what a ClientApp does on its first message:
import the ClientApp, build the model, load the received weights, build Ultralytics' trainer
and data pipeline, and reach the first batch. Writes ``benchmarks/results/cold_start.json``.

    .venv/bin/python benchmarks/cold_start.py --samples 3
    .venv/bin/python benchmarks/cold_start.py --samples 3 --image fedyolo-client:0.1.0
    .venv/bin/python benchmarks/cold_start.py --samples 3 --out cold_start_avx2.json

``--image`` runs the same probe inside the client image as well (its Python, its packages;
the shard mounted read-only), the way a fresh client container starts.

``prestarted`` (every run): the same first message on a node whose spare warm worker was started
with the node (``fl_client.spare.spare_command``, what ``deploy.supernode`` and the local
deployment do) and is warm: a fresh process does what ``flwr-clientapp`` does with the warm
worker on (imports ``fl_client.client_app``, hands the message over with ``worker.call``), and
``first_batch`` is from that process's creation to the first batch in the spare, which is
started with the same first-batch probe. ``spare_ready`` is the spare's own start, from its
spawn to listening warm: the time the node spends on it while it connects and waits.
``node_start_to_first_batch``: a message already waiting when the node starts (joining a
federation under way), from the spare's spawn to the first batch.
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


PROBE_SPARE = r"""
import os, sys, time
import fl_client.train as T
class Ready(Exception):
    pass
factory = T.local_trainer_class
def probe_class():
    class Probe(factory()):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            def first_batch(trainer):
                with open(os.environ["FEDYOLO_PROBE_MARK"], "w") as f:
                    f.write(repr(time.time()))
                raise Ready
            self.add_callback("on_train_batch_start", first_batch)
    return Probe
T.local_trainer_class = probe_class
from fl_client.worker import main
main(sys.argv[1:])
"""

PROBE_CALLER = r"""
import json, sys, time
import psutil
t_proc = psutil.Process().create_time()
import fl_client.client_app  # noqa: F401  (what flwr-clientapp loads)
from flwr.app import Context, RecordDict
from fl_client import worker
from fl_client.flower_adapter import recorddict_from_bytes
content = recorddict_from_bytes(open(sys.argv[1], "rb").read())
node = json.loads(sys.argv[2])
ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
try:
    worker.call("train", content, ctx)
except worker.WorkerError as e:  # the probe's Ready: the first batch was reached
    if not str(e).startswith("Ready"):
        raise
print(json.dumps({"created": t_proc}))
"""


def _message(args, data: Path, work: Path) -> Path:
    """A round-1 train message for the shard, as the server makes it, serialized."""
    from flwr.app import RecordDict

    from fl_client.data.formats import read_data_yaml
    from fl_client.flower_adapter import recorddict_to_bytes
    from fl_client.model import build_model, to_record
    from fl_server.config import compose
    from fl_server.federation import round_config

    cfg = compose([
        f"model.cfg={args.model}", f"train.imgsz={args.imgsz}", "train.batch=16",
        "train.lr0=0.01", "train.mosaic=0.0", "train.workers=0", "seed=0",
    ])  # fmt: skip
    names = read_data_yaml(data).names
    model = build_model(args.model, names)
    config = round_config(cfg, names, data.parent, model.yaml).with_round(server_round=1)
    content = RecordDict({"arrays": to_record(model), "config": config.to_record()})
    path = work / "message.bin"
    path.write_bytes(recorddict_to_bytes(content))
    return path


def _prestarted(args, work: Path, data: Path) -> list[dict]:
    """A node's first message with its spare (module docstring), each sample twice: the message
    after the spare is warm (``first_batch``, from the caller's creation), and a message that
    is already waiting when the node starts (``node_start_to_first_batch``, from the spare's
    spawn: a node joining a federation that is under way)."""
    message = _message(args, data, work)
    samples = []
    for i in range(args.samples + 1):  # the first run warms the OS page cache; not reported
        ready, created, mark = _spare_and_message(work, data, message, i, wait=True)
        t_spawn, _, mark_at_once = _spare_and_message(work, data, message, i, wait=False)
        marks = {
            "spare_ready": ready,
            "first_batch": mark - created,
            "node_start_to_first_batch": mark_at_once - t_spawn,
        }
        if i:
            samples.append(marks)
            print("prestarted", marks, flush=True)
    return samples


def _spare_and_message(
    work: Path, data: Path, message: Path, i: int, wait: bool
) -> tuple[float, float, float]:
    """Spawn a probed spare, send it the message (after it is warm and 1 s idle with ``wait``,
    else at once); (its seconds to warm, or its spawn time without ``wait``; the caller's
    creation time; the first batch's time)."""
    from fl_client import spare as spares

    node = json.dumps({"data-path": str(data), "warm-worker": True, "partition-id": 0})
    mark, log = work / f"mark{i}{wait:d}", work / f"spare{i}{wait:d}.log"
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["FEDYOLO_PROBE_MARK"] = str(mark)
    spec = spares.spare_command(env=env)
    cmd = [spec.cmd[0], "-c", PROBE_SPARE, *spec.cmd[3:]]  # its -m fl_client.worker, probed
    t_spawn = time.time()
    with spec.listener, log.open("w") as err:
        spare = subprocess.Popen(cmd, env=spec.env, pass_fds=spec.fds, stderr=err, cwd=ROOT)
    ready = t_spawn
    if wait:
        while "as a spare" not in log.read_text():
            if spare.poll() is not None:
                raise RuntimeError(f"the spare ended ({spare.returncode}): {log.read_text()}")
            time.sleep(0.02)
        ready = time.time() - t_spawn
        time.sleep(1.0)  # the node connects and waits; the spare is idle
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE_CALLER, str(message), node],
            capture_output=True, text=True, env=spec.node_env, cwd=ROOT, check=True,
        )  # fmt: skip
    finally:
        spare.kill()
        spare.wait()
    if "adopted" not in log.read_text():
        raise RuntimeError(f"the message did not adopt the spare: {log.read_text()}")
    created = json.loads(out.stdout.strip().splitlines()[-1])["created"]
    return ready, created, float(mark.read_text())


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
    prestarted = _prestarted(args, work, data)
    result["prestarted"] = {
        "what": "a node whose spare warm worker is warm: a fresh flwr-clientapp-like process's "
        "creation to the first batch in the spare (first_batch); the spare's spawn to "
        "listening warm (spare_ready), spent while the node connects; a message waiting when "
        "the node starts: the spare's spawn to the first batch (node_start_to_first_batch)",
        "median_seconds": {
            k: sorted(s[k] for s in prestarted)[len(prestarted) // 2] for k in prestarted[0]
        },
        "samples": prestarted,
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
