"""``fedyolo bench MODEL...``: what a model costs on this machine, and what it is worth.

For every model (a ``.pt`` checkpoint, an ``.onnx`` file or an edge bundle folder), image size
and thread count: latency p50/p95/p99 and throughput of the model itself (a preprocessed
1×3×imgsz×imgsz input to raw outputs, no NMS: the part the export changes), the process's peak
resident memory, the file size and the held-out mAP50-95 through Ultralytics' validator. Every
model runs at the same input size by default and every row gets its mAP where a held-out set
is known (``plan``).

Each model and image size is timed in a child process of its own, so the peak RSS is that
model's (runtime, weights and arena) and one model's allocations do not slow the next. A
fixed-shape ONNX file runs at its own input size only; a ``.pt`` runs at every ``imgsz``.

Runtimes: a ``.pt`` runs in PyTorch, an OpenVINO bundle (``fedyolo export format=openvino``)
in OpenVINO, an ONNX file in each of ``runtimes``: ONNX Runtime, and with ``openvino`` also
OpenVINO's CPU plugin, which runs the same file, an INT8 one included (its QDQ pairs become
OpenVINO's INT8 kernels). OpenVINO picks its own inference precision (bf16 for an fp32 model on a
CPU with AMX): the row records it, and its mAP is measured through OpenVINO too.

Writes ``bench.json``, ``bench.md`` (the table) and ``bench.png`` (mAP50-95 against latency and
against file size).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from deploy.edge import EdgeError
from fl_client.evaluate import evaluate_checkpoint
from fl_client.lazy import lazy
from fl_client.memory import peak_rss_mib
from fl_client.ultralytics_adapter import load_checkpoint, load_yolo

LOGGER = logging.getLogger(__name__)
ort = lazy("onnxruntime")
ov = lazy("openvino")
OPENVINO_DIR = "model_openvino_model"  # what `fedyolo export format=openvino` writes
matplotlib = lazy("matplotlib")
plt = lazy("matplotlib.pyplot")


def ort_session(path: Path, threads: int, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session as the bench times it; ``profile_prefix``: with ONNX
    Runtime's profiler on, its JSON written under that prefix (``end_profiling()``)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_runner(path: Path, threads: int) -> tuple[Callable[[np.ndarray], list], int]:
    """A function running the ONNX file on one input, and the file's input size."""
    sess = ort_session(path, threads)
    inp = sess.get_inputs()[0]
    size = inp.shape[-1] if isinstance(inp.shape[-1], int) else None

    def run(x: np.ndarray) -> list:
        return sess.run(None, {inp.name: x})

    return run, size


def openvino_runner(path: Path, threads: int) -> tuple[Callable[[np.ndarray], list], str]:
    """A function running the model (``.onnx`` or OpenVINO ``.xml``) in OpenVINO's CPU plugin on
    one input, and the inference precision OpenVINO chose for it."""
    compiled = ov.Core().compile_model(
        str(path),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()
    outputs = range(len(compiled.outputs))

    def run(x: np.ndarray) -> list:
        request.infer({0: x})
        return [request.get_output_tensor(i).data for i in outputs]

    precision = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: bf16, f32, ...
    return run, getattr(precision, "get_type_name", lambda: str(precision))()


def torch_runner(path: Path, threads: int) -> Callable[[np.ndarray], list]:
    torch.set_num_threads(threads)
    model = load_yolo(path, "bench").model.float().eval()  # weights-only: it runs no code

    def run(x: np.ndarray) -> list:
        with torch.inference_mode():
            y = model(torch.from_numpy(x))
        return [(y[0] if isinstance(y, list | tuple) else y).numpy()]

    return run


def timed(run: Callable[[np.ndarray], list], x: np.ndarray, runs: int, warmup: int) -> dict:
    """p50/p95/p99/mean latency in ms over ``runs`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run(x)
    t = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        run(x)
        t[i] = time.perf_counter() - t0
    t *= 1e3
    p50, p95, p99 = np.percentile(t, [50, 95, 99])
    return {
        "p50_ms": round(float(p50), 3),
        "p95_ms": round(float(p95), 3),
        "p99_ms": round(float(p99), 3),
        "mean_ms": round(float(t.mean()), 3),
        "throughput_ips": round(1e3 / float(t.mean()), 2),
        "runs": runs,
    }


def _measure(spec: dict) -> dict:
    """In the child: time one model at one size for each thread count; the peak RSS."""
    path, imgsz = Path(spec["path"]), int(spec["imgsz"])
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    rows = []
    for threads in spec["threads"]:
        extra = {}
        if spec.get("runtime") == "openvino":
            run, extra["precision"] = openvino_runner(path, threads)
        elif path.suffix == ".onnx":
            run, _ = onnx_runner(path, threads)
        else:
            run = torch_runner(path, threads)
        rows.append({"threads": threads, **extra, **timed(run, x, spec["runs"], spec["warmup"])})
    return {"rows": rows, "peak_rss_mb": round(peak_rss_mib(), 1)}


def measure_in_child(
    path: Path,
    imgsz: int,
    threads: Sequence[int],
    runs: int,
    warmup: int,
    runtime: str | None = None,
):
    spec = {
        "path": str(path),
        "imgsz": imgsz,
        "threads": list(threads),
        "runs": runs,
        "warmup": warmup,
        "runtime": runtime,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.edge.bench", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(max(threads))},
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeError(f"bench {path} at {imgsz}: the measuring process failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _resolve(model: Path) -> tuple[Path, dict | None]:
    """A model file and its bundle's model.json (None for a bare file)."""
    if model.is_dir():
        meta = model / "model.json"
        if not meta.is_file():
            raise EdgeError(f"bench: {model} is a folder without model.json (not an edge bundle)")
        m = json.loads(meta.read_text())
        if m["file"] == OPENVINO_DIR:  # an OpenVINO bundle: its model's .xml
            return _openvino_xml(model / OPENVINO_DIR), m
        return model / m["file"], m
    if not model.is_file():
        raise EdgeError(f"bench: {model} not found")
    if model.suffix not in (".pt", ".onnx"):
        raise EdgeError(f"bench: {model}: only .pt, .onnx and bundle folders are measured")
    sibling = model.parent / "model.json"
    m = json.loads(sibling.read_text()) if sibling.is_file() else None
    if m is not None and m.get("file") != model.name:
        m = None
    return model, m


def _openvino_xml(folder: Path) -> Path:
    found = sorted(folder.glob("*.xml"))
    if len(found) != 1:
        raise EdgeError(f"bench: {folder} holds {len(found)} OpenVINO .xml models, not one")
    return found[0]


def _runtime(path: Path) -> str:
    return {".pt": "torch", ".xml": "openvino"}.get(path.suffix, "onnxruntime")


def _size_mb(path: Path) -> float:
    """The model's bytes: an OpenVINO model's .xml and .bin together."""
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return round(sum(f.stat().st_size for f in files if f.is_file()) / 1e6, 3)


def openvino_folder(onnx: Path, out: Path) -> Path:
    """``onnx`` as an OpenVINO model folder Ultralytics' validator loads (``*_openvino_model``
    with the ONNX file's Ultralytics metadata as ``metadata.yaml``), weights as they are (no fp16
    compression): for the mAP of the ONNX file run in OpenVINO."""
    import hashlib

    import onnx as onnx_lib
    import yaml

    key = hashlib.sha256(onnx.read_bytes()).hexdigest()[:12]
    folder = out / ".openvino" / f"{onnx.stem}-{key}_openvino_model"
    xml = folder / f"{onnx.stem}.xml"
    if not xml.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov.Core().read_model(str(onnx)), str(xml), compress_to_fp16=False)
        model = onnx_lib.load(str(onnx), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}  # strings, as the file holds them
        (folder / "metadata.yaml").write_text(yaml.safe_dump(meta))
    return folder


def _fixed_size(path: Path, meta: dict | None) -> int | None:
    """The input size an exported model was fixed at (None: it takes any, or a ``.pt``)."""
    if path.suffix == ".onnx":
        return onnx_runner(path, 1)[1]
    if path.suffix == ".xml" and meta and meta.get("imgsz"):
        return int(meta["imgsz"][0])
    return None


def _label(path: Path, meta: dict | None) -> str:
    if meta is None:
        return path.name if path.suffix == ".pt" else f"{path.name} (onnx)"
    return meta["variant"]


def _trained_imgsz(ckpt: dict) -> int | None:
    args = ckpt.get("train_args") if isinstance(ckpt, dict) else None
    size = args.get("imgsz") if isinstance(args, dict) else None
    return size if isinstance(size, int) and size > 0 else None


def _run_heldout(path: Path) -> Path | None:
    """The held-out set of the run a checkpoint sits in (``runs/<name>/best.pt``)."""
    from fl_server.engines import RunDir

    found = RunDir(path.parent).server_val_yaml
    return found if found.is_file() else None


def plan(models: Sequence[Path], cfg) -> list[tuple[Path, dict | None, list[int], str | None]]:
    """Each model's file, bundle metadata, input sizes and held-out data.

    Every model is compared at the same input size by default (``imgsz: null``): the size the
    ONNX files and bundles were exported at, else each checkpoint's training size; a fixed-shape
    ONNX file runs at its own size only. The held-out data is ``data``, else the bundle's own,
    else the first bundle's among the models given, else the run directory's of a checkpoint
    (so a ``best.pt`` benched beside its bundles gets its mAP too)."""
    resolved = [_resolve(Path(m)) for m in models]
    fixed, ckpts = [], {}
    for path, meta in resolved:
        size = _fixed_size(path, meta)
        if size and size not in fixed:
            fixed.append(size)
        if path.suffix == ".pt":  # refused here in one line, not in the measuring child
            ckpts[path] = load_checkpoint(path, "bench")[1]
    shared = next((m["heldout_data"] for _, m in resolved if m and m.get("heldout_data")), None)
    out = []
    for path, meta in resolved:
        if path.suffix != ".pt":
            size = _fixed_size(path, meta)
            sizes = [size] if size else list(cfg.imgsz or fixed or [640])
        elif cfg.imgsz:
            sizes = list(cfg.imgsz)
        else:
            trained = _trained_imgsz(ckpts[path])
            sizes = fixed or ([trained] if trained else [640])
        data = cfg.data or (meta or {}).get("heldout_data") or shared
        if not data and path.suffix == ".pt":
            data = _run_heldout(path)
        out.append((path, meta, sizes, str(data) if data else None))
    return out


def bench(models: Sequence[Path], cfg) -> dict:
    """Measure ``models``; write bench.json/.md/.png to ``cfg.out`` (or beside the first)."""
    out = Path(cfg.out) if cfg.out else _resolve(Path(models[0]))[0].parent
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    failed: list[dict] = []  # a model a runtime could not run: named, with the reason
    runtimes = list(cfg.runtimes)
    planned = plan(models, cfg)
    if "openvino" in runtimes or any(_runtime(p) == "openvino" for p, *_ in planned):
        _need_openvino()
    for path, meta, sizes, data in planned:
        own = _runtime(path)
        for runtime in runtimes if own == "onnxruntime" else [own]:
            for imgsz in sizes:
                label = _label(path, meta)
                if runtime == "openvino" and own == "onnxruntime":
                    label += " · openvino"
                try:
                    m = measure_in_child(
                        path, imgsz, cfg.threads, int(cfg.runs), int(cfg.warmup), runtime
                    )
                except EdgeError as e:  # recorded; the other models are still measured
                    LOGGER.warning("%s", e)
                    failed.append(
                        {
                            "model": label,
                            "runtime": runtime,
                            "file": str(path),
                            "imgsz": imgsz,
                            "error": str(e),
                        }  # fmt: skip
                    )
                    continue
                map50_95 = None
                if data and Path(data).is_file():
                    validated = path.parent if own == "openvino" else path
                    if runtime == "openvino" and own == "onnxruntime":
                        validated = openvino_folder(path, out)
                    map50_95 = evaluate_checkpoint(
                        validated,
                        Path(data),
                        imgsz=imgsz,
                        batch=1,
                        device="cpu",
                        workdir=out / ".bench-val",
                        rect=False,
                    )["map50_95"]
                for row in m["rows"]:
                    results.append(
                        {
                            "model": label,
                            "runtime": runtime,
                            "file": str(path),
                            "size_mb": _size_mb(path),
                            "imgsz": imgsz,
                            **row,
                            "peak_rss_mb": m["peak_rss_mb"],
                            "map50_95": None if map50_95 is None else round(map50_95, 4),
                            "data": str(data) if data else None,
                        }
                    )
    report = {
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "what": "latency of the model alone: a preprocessed 1x3xSxS float32 input to raw "
        "outputs (no NMS); mAP50-95 through Ultralytics' validator on the held-out set",
        "results": results,
        "failed": failed,
        "out": str(out),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(table(results, failed))
    _plot(results, out / "bench.png")
    return report


def _need_openvino() -> None:
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        raise EdgeError(
            "bench: runtime openvino needs the openvino package (pip install 'fedyolo[openvino]'), "
            "not installed"
        )


def _machine() -> dict:
    import importlib.util

    found = {
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        **({"openvino": ov.get_version()} if importlib.util.find_spec("openvino") else {}),
    }
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        **found,
    }


def table(results: list[dict], failed: Sequence[dict] = ()) -> str:
    head = (
        "| model | imgsz | threads | p50 ms | p95 ms | p99 ms | images/s | peak RSS MB "
        "| size MB | mAP50-95 |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        m = "" if r["map50_95"] is None else f"{r['map50_95']:.4f}"
        rows.append(
            f"| {r['model']} | {r['imgsz']} | {r['threads']} | {r['p50_ms']:.2f} "
            f"| {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['throughput_ips']:.1f} "
            f"| {r['peak_rss_mb']:.0f} | {r['size_mb']:.2f} | {m} |"
        )
    for f in failed:  # the same ten columns; the reason where the threads would be
        rows.append(
            "| "
            + " | ".join([f["model"], str(f["imgsz"]), f"failed: {f['error']}"] + [""] * 7)
            + " |"
        )
    return head + "\n".join(rows) + "\n"


def _plot(results: list[dict], path: Path) -> None:
    """Two panels, mAP50-95 against p50 latency and against file size, both axes from 0 (a
    0.0005 difference looks like one): one colour per model, one marker per thread count, a
    legend instead of labels on the points (they overlapped)."""
    matplotlib.use("Agg")  # before pyplot loads (its first use below)
    rows = [r for r in results if r["map50_95"] is not None]
    fig, (lat, size) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>p*h"
    names = list(dict.fromkeys(f"{r['model']} {r['imgsz']}px" for r in rows))
    threads = sorted({r["threads"] for r in rows})
    for r in rows:
        name = f"{r['model']} {r['imgsz']}px"
        style = {
            "color": colours[names.index(name) % len(colours)],
            "marker": markers[threads.index(r["threads"]) % len(markers)],
            "s": 40,
        }
        lat.scatter(r["p50_ms"], r["map50_95"], **style)
        size.scatter(r["size_mb"], r["map50_95"], **style)
    top = max([r["map50_95"] for r in rows] + [0.05]) * 1.15
    axes = ((lat, "p50 latency (ms)", "p50_ms"), (size, "file size (MB)", "size_mb"))
    for ax, label, key in axes:
        ax.set_xlim(0, max([r[key] for r in rows] + [1e-3]) * 1.15)
        ax.set_ylim(0, top)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    lat.set_ylabel("held-out mAP50-95")
    handles = [
        plt.Line2D([], [], color=colours[i % len(colours)], marker="o", ls="", label=n)
        for i, n in enumerate(names)
    ] + [
        plt.Line2D([], [], color="grey", marker=markers[i % len(markers)], ls="", label=f"{t} thr")
        for i, t in enumerate(threads)
    ]
    if handles:  # beside the panels, never over a point
        fig.legend(handles=handles, fontsize=7, loc="center right")
    title = "mAP50-95 vs latency and size" if rows else "no held-out data: see bench.md"
    fig.suptitle(f"{title} (upper left is better)" if rows else title)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # the measuring child: one JSON line on stdout
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
