"""``fedyolo export MODEL.pt [key=value ...]``: an edge bundle, gated.

The export itself is Ultralytics' exporter (``YOLO(pt).export``: ONNX fp32/fp16, simplified
with ``onnxslim``; TensorRT ``engine`` where a GPU is), on the checkpoint loaded weights-only
(``fl_client.ultralytics_adapter``: a ``.pt`` never runs code). An ONNX file then gets its box
decode's softmax on the last axis (``quantize.dfl_last_axis``: the same outputs, ~6% faster;
``model.json`` lists it under ``rewrites``). INT8 ONNX is that fp32 graph quantized by ONNX
Runtime with fedyolo's calibration (``deploy.edge.quantize``).

A bundle is a folder::

    model.onnx          the model (model-int8.onnx for INT8)
    model.json          what an edge runtime needs: class names, input/output names and shapes,
                        preprocessing, thresholds, NMS outside, the source run, best.pt's sha256,
                        the data version, quantization details, and the gates' verdict
    gates.json          the parity report: every gate's numbers and thresholds
    calibration.json    INT8: the merged activation ranges and where they came from

Gates (thresholds in ``configs/edge/export.yaml``):

* **parity** (fp32): max |ONNX − PyTorch| over the raw outputs of held-out sample images;
* **accuracy**: the exported file's held-out mAP50-95 through Ultralytics' validator against the
  checkpoint's, same images, same letterbox: within ``map_tolerance`` (fp32/fp16), at most
  ``int8_max_drop`` lower (INT8).

A failed gate leaves the bundle with ``"status": "rejected"`` and one line naming the numbers;
:func:`check` re-runs the gates of an existing bundle (a file changed after the export fails).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import ultralytics
import yaml

from deploy.edge import EdgeError, inputs
from deploy.edge import quantize as q
from deploy.edge.bench import onnx_runner, ort_session, timed, torch_runner
from fl_client.errors import MissingInput
from fl_client.evaluate import evaluate_checkpoint
from fl_client.ultralytics_adapter import load_checkpoint, load_yolo
from fl_server.engines import RunDir

LOGGER = logging.getLogger("fedyolo")


def sha256(path: Path) -> str:
    """Of a file, or of a folder's files (names and bytes, sorted): an OpenVINO model."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@dataclass
class Source:
    """A checkpoint and what is known about it from its run directory."""

    checkpoint: Path
    sha256: str
    names: dict[int, str]
    train_imgsz: int
    run_dir: Path | None
    data_version: str | None
    heldout: Path | None  # the server's held-out data.yaml
    shards: list[Path] = field(default_factory=list)  # the clients' train image folders
    round: int | None = None


def source_of(checkpoint: Path, data: str | None = None) -> Source:
    checkpoint = Path(checkpoint).expanduser().resolve()
    if not checkpoint.is_file():
        raise MissingInput(f"export: checkpoint {checkpoint} not found")
    if checkpoint.suffix != ".pt":
        raise EdgeError(f"export: {checkpoint} is not a .pt checkpoint")
    model, ckpt = load_checkpoint(checkpoint, "export")  # weights-only: it runs no code
    args = ckpt.get("train_args") or {}
    run = RunDir(checkpoint.parent)  # a run's best.pt or last.pt, or a checkpoint elsewhere
    run_dir = run.path if run.manifest.is_file() else None
    data_version = heldout = None
    shards: list[Path] = []
    if run_dir is not None:
        manifest = json.loads(run.manifest.read_text())
        data_version = manifest.get("data", {}).get("data_version")
        if run.server_val_yaml.is_file():
            heldout = run.server_val_yaml
        shards = sorted(
            (p / "train" for p in run.data.glob("client_*") if (p / "train").is_dir()),
            key=lambda p: int(p.parent.name.split("_")[1]),
        )
    if data:
        heldout = Path(data).expanduser().resolve()
        if not heldout.is_file():
            raise MissingInput(f"export: data={data} not found")
    return Source(
        checkpoint=checkpoint,
        sha256=sha256(checkpoint),
        names={int(k): str(v) for k, v in model.names.items()},
        train_imgsz=int(args.get("imgsz") or 640),
        run_dir=run_dir,
        data_version=data_version,
        heldout=heldout,
        shards=shards,
        round=(ckpt.get("fedyolo") or {}).get("round"),
    )


def _variant(cfg, activations: str | None = None) -> str:
    precision = {32: "fp32", 16: "fp16", 8: "int8"}[int(cfg.quantize)]
    return f"{cfg.format}-{precision}" + (f"-{activations}" if activations else "")


def _ultralytics_export(src: Source, work: Path, cfg, imgsz: int, quantize: int) -> Path:
    """Ultralytics' exporter on a copy of the checkpoint in ``work`` (it writes beside it)."""
    work.mkdir(parents=True, exist_ok=True)
    pt = work / "model.pt"
    shutil.copy2(src.checkpoint, pt)
    f = load_yolo(pt, "export").export(
        format=cfg.format,
        imgsz=imgsz,
        quantize=quantize,
        simplify=True,
        dynamic=False,
        nms=False,
        batch=1,
        device=0 if cfg.format == "engine" else "cpu",
    )
    if not f or not Path(f).exists():
        raise EdgeError(f"export: Ultralytics' exporter produced no {cfg.format} file")
    return Path(f)


def _unavailable(fmt: str, quantize: int) -> str | None:
    """None when ``fmt`` can be exported here, else why not (one line). Nothing is installed
    at run time: Ultralytics' exporter would pip-install a missing package."""
    if fmt == "engine":
        if not torch.cuda.is_available():
            return "format=engine (TensorRT) needs an NVIDIA GPU; this machine has no CUDA device"
        if importlib.util.find_spec("tensorrt") is None:
            return "format=engine needs the tensorrt package (pip install tensorrt), not installed"
    if fmt == "openvino" and importlib.util.find_spec("openvino") is None:
        return (
            "format=openvino needs the openvino package (pip install 'fedyolo[openvino]'), "
            "not installed"
        )
    if fmt != "onnx" and quantize == 8:
        return (
            f"format={fmt} quantize=8: INT8 is built as ONNX only (quantize=32 or 16; OpenVINO "
            "runs the INT8 ONNX bundle: fedyolo bench BUNDLE runtimes=[openvino])"
        )
    return None


def _io(onnx_path: Path) -> dict:
    sess = _session(onnx_path)

    def shapes(items):
        return [{"name": i.name, "shape": list(i.shape), "type": i.type} for i in items]

    return {"inputs": shapes(sess.get_inputs()), "outputs": shapes(sess.get_outputs())}


def _session(path: Path):
    return ort_session(path, min(2, os.cpu_count() or 1))


def _samples(src: Source, n: int) -> list[Path]:
    if src.heldout is None:
        raise EdgeError(
            "export: no held-out set to gate on (the checkpoint is not in a run directory): "
            "give data=<held-out data.yaml>"
        )
    return inputs.spread(inputs.image_files(_split_dir(src.heldout)), n)


def _split_dir(data_yaml: Path) -> Path:
    d = yaml.safe_load(data_yaml.read_text())
    root = Path(d.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = data_yaml.parent / root
    val = d.get("val") or d.get("test")
    return root / val if isinstance(val, str) else root


def parity(checkpoint: Path, onnx_path: Path, samples: list[Path], imgsz: int) -> float:
    """Max |ONNX − PyTorch| over the raw outputs of ``samples``."""
    run_onnx, _ = onnx_runner(onnx_path, min(2, os.cpu_count() or 1))
    run_torch = torch_runner(checkpoint, min(2, os.cpu_count() or 1))
    worst = 0.0
    for x in inputs.batches(samples, imgsz):
        a, b = run_onnx(x)[0].astype(np.float64), run_torch(x)[0].astype(np.float64)
        if a.shape != b.shape:
            raise EdgeError(f"parity: output shape {a.shape} of {onnx_path} is not {b.shape}")
        worst = max(worst, float(np.abs(a - b).max()) if np.isfinite(a).all() else float("inf"))
    return worst


def held_out_map(model: Path, data: Path, imgsz: int, work: Path) -> float:
    return evaluate_checkpoint(
        model, data, imgsz=imgsz, batch=1, device="cpu", workdir=work, rect=False
    )["map50_95"]


def gates(
    src: Source,
    model: Path,
    cfg,
    imgsz: int,
    precision: str,
    work: Path,
    ref_map=None,
    parity_check: bool = True,
):
    """Every gate's numbers, thresholds and verdict for ``model`` (an exported file); the
    parity gate runs the file in ONNX Runtime (``parity_check=False`` for other runtimes)."""
    g = cfg.gates
    report: dict = {"imgsz": imgsz, "checks": []}
    if src.heldout is None:
        _samples(src, 1)  # one line: no held-out set to gate on
    if parity_check:
        samples = _samples(src, int(g.samples))
        diff = parity(src.checkpoint, model, samples, imgsz)
        check = {
            "gate": "parity",
            "max_abs_diff": diff,
            "samples": len(samples),
            "threshold": float(g.parity_max_abs) if precision == "fp32" else None,
        }
        check["passed"] = precision != "fp32" or diff <= float(g.parity_max_abs)
        report["checks"].append(check)
    if ref_map is None:
        ref_map = held_out_map(src.checkpoint, src.heldout, imgsz, work)
    got = held_out_map(model, src.heldout, imgsz, work)
    if precision == "int8":
        limit = float(g.int8_max_drop)
        ok = ref_map - got <= limit
        rule = f"drop <= {limit}"
    else:
        limit = float(g.map_tolerance)
        ok = abs(ref_map - got) <= limit
        rule = f"|difference| <= {limit}"
    report["checks"].append(
        {
            "gate": "accuracy",
            "data": str(src.heldout),
            "checkpoint_map50_95": round(ref_map, 5),
            "export_map50_95": round(got, 5),
            "difference": round(got - ref_map, 5),
            "rule": rule,
            "passed": bool(ok),
        }
    )
    report["passed"] = all(c["passed"] for c in report["checks"])
    return report


def verdict_line(report: dict, model: Path) -> str:
    """One line with the numbers of the failed gates ('' when all passed)."""
    bad = [c for c in report["checks"] if not c["passed"]]
    parts = []
    for c in bad:
        if c["gate"] == "parity":
            parts.append(f"parity max |diff| {c['max_abs_diff']:.4g} > {c['threshold']}")
        else:
            parts.append(
                f"mAP50-95 {c['export_map50_95']:.4f} vs checkpoint "
                f"{c['checkpoint_map50_95']:.4f} (rule {c['rule']})"
            )
    if report.get("file_sha256_matches") is False:
        parts.append("the file's sha256 is not the one model.json records")
    return f"{model.name} rejected: " + "; ".join(parts) if parts else ""


def calibration_sets(src: Source, cfg) -> tuple[str, list[tuple[str, list[Path]]]]:
    """How INT8 is calibrated and on which images: ``(method, [(where, images), ...])``, one
    entry per client for ``federated``. Checked before anything is exported: never the
    held-out set the gates evaluate on."""
    n = int(cfg.int8.images)
    how = str(cfg.int8.calibration)
    if how in ("federated", "pooled"):
        if not src.shards:
            raise EdgeError(
                f"int8.calibration={how}: the checkpoint is not in a run directory with client "
                "shards; give int8.calibration=<folder of images>"
            )
        per = [inputs.image_files(s) for s in src.shards]
        total = sum(len(p) for p in per)
        take = [max(1, round(n * len(p) / total)) if total > n else len(p) for p in per]
        sets = [
            (str(s), inputs.spread(p, k)) for s, p, k in zip(src.shards, per, take, strict=True)
        ]
        return how, sets
    folder = Path(how).expanduser().resolve()
    if src.heldout is not None and folder in (
        _split_dir(src.heldout).resolve(),
        (_split_dir(src.heldout) / "images").resolve(),
    ):
        raise EdgeError(f"int8.calibration: {folder} is the held-out set the gates evaluate on")
    return "folder", [(str(folder), inputs.spread(inputs.image_files(folder), n))]


def calibration_ranges(fp32: Path, method: str, sets, imgsz: int, asked: int) -> dict:
    """The merged activation ranges, and where they came from."""
    if method == "federated":  # what each client computes on its own images, merged
        merged = q.merge_ranges([q.activation_ranges(fp32, imgs, imgsz) for _, imgs in sets])
    else:
        merged = q.activation_ranges(fp32, [p for _, imgs in sets for p in imgs], imgsz)
    merged["source"] = {
        "method": method,
        "parts": [{"images_from": where, "images": len(imgs)} for where, imgs in sets],
    }
    if merged["images"] < asked:
        LOGGER.warning(
            "INT8 calibration on %d images (asked %d): all there are", merged["images"], asked
        )
    return merged


def export(checkpoint: Path, cfg) -> dict:
    """Export ``checkpoint`` to a gated edge bundle; returns its model.json."""
    src = source_of(checkpoint, cfg.data)
    imgsz = int(cfg.imgsz or src.train_imgsz)
    quantize = int(cfg.quantize)
    why = _unavailable(str(cfg.format), quantize)
    if why:
        raise EdgeError(why)
    out = Path(
        cfg.out or src.checkpoint.parent / "edge" / f"{src.checkpoint.stem}-{_variant(cfg)}-{imgsz}"
    )
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    t0 = time.perf_counter()
    calibration = calibration_sets(src, cfg) if quantize == 8 and cfg.format == "onnx" else None
    exported = _ultralytics_export(src, work, cfg, imgsz, 16 if quantize == 16 else 32)
    ref_map = None
    extra: dict = {}
    if cfg.format == "onnx":  # before the gates and the INT8 copies: they check what ships
        extra["rewrites"] = ["dfl-softmax-last-axis"] if q.dfl_last_axis(exported) else []
    if cfg.format != "onnx":  # TensorRT, OpenVINO: the accuracy gate (no ONNX Runtime here)
        final = out / ("model.engine" if cfg.format == "engine" else "model_openvino_model")
        if final.is_dir():
            shutil.rmtree(final)
        final.unlink(missing_ok=True)
        os.replace(exported, final)
        precision = "fp16" if quantize == 16 else "fp32"
        report = gates(src, final, cfg, imgsz, precision, work, parity_check=False)
        io = {}
    elif quantize == 8:
        ranges = calibration_ranges(exported, *calibration, imgsz, int(cfg.int8.images))
        q.write_ranges(out / "calibration.json", ranges)
        acts = list(q.ACTIVATIONS) if cfg.int8.activations == "auto" else [cfg.int8.activations]
        op_sets = list(q.OPS) if cfg.int8.ops == "auto" else [cfg.int8.ops]
        fp32_p50 = _p50(exported, imgsz)
        tried = []
        for ops in op_sets:
            for act in acts:
                f = q.quantize(
                    exported,
                    work / f"model-int8-{ops}-{act}.onnx",
                    ranges,
                    activations=act,
                    per_channel=bool(cfg.int8.per_channel),
                    ops=ops,
                )
                rep = gates(src, f, cfg, imgsz, "int8", work, ref_map)
                ref_map = rep["checks"][-1]["checkpoint_map50_95"]
                tried.append(
                    {
                        "activations": act,
                        "ops": ops,
                        "file": f,
                        "p50_ms": _p50(f, imgsz),
                        "gates": rep,
                    }
                )
        passing = [t for t in tried if t["gates"]["passed"]] or tried
        best = min(passing, key=lambda t: t["p50_ms"])
        final = out / "model-int8.onnx"
        os.replace(best["file"], final)
        report = best["gates"]
        extra["int8"] = {
            "activations": best["activations"],
            "weights": "s8",
            "per_channel": bool(cfg.int8.per_channel),
            "ops": best["ops"],
            "quantized_ops": (
                sorted(q.QUANTIZED_OPS) if best["ops"] == "weighted" else "all but the decode"
            ),
            "calibration": {"images": ranges["images"], **ranges["source"]},
            "choice": {
                "rule": f"activations={cfg.int8.activations} ops={cfg.int8.ops}",
                "measured_p50_ms": {"fp32": fp32_p50, **{_tag(t): t["p50_ms"] for t in tried}},
                "threads": min(2, os.cpu_count() or 1),
                "gates_passed": {_tag(t): t["gates"]["passed"] for t in tried},
            },
        }
        io = _io(final)
    else:
        final = out / "model.onnx"
        os.replace(exported, final)
        report = gates(src, final, cfg, imgsz, "fp16" if quantize == 16 else "fp32", work)
        io = _io(final)
    for stale in ("model.onnx", "model-int8.onnx", "model.engine"):
        if (out / stale).exists() and (out / stale) != final:
            (out / stale).unlink()
    if (out / "model_openvino_model") != final:
        shutil.rmtree(out / "model_openvino_model", ignore_errors=True)
    meta = _model_json(src, cfg, final, imgsz, io, report, extra)
    meta["bundle"] = str(out)
    meta["export_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gates.json").write_text(json.dumps(report, indent=1))
    (out / "model.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return meta


def _tag(tried: dict) -> str:
    """A tried INT8 variant's name in model.json: ``<ops>-<activations>``."""
    return f"{tried['ops']}-{tried['activations']}"


def _p50(path: Path, imgsz: int) -> float:
    run, _ = onnx_runner(path, min(2, os.cpu_count() or 1))
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    return timed(run, x, runs=30, warmup=5)["p50_ms"]


def _model_json(src: Source, cfg, final: Path, imgsz, io, report, extra) -> dict:
    nc = len(src.names)
    return {
        "status": "accepted" if report["passed"] else "rejected",
        "file": final.name,
        "sha256": sha256(final),
        "size_bytes": _size(final),
        "format": str(cfg.format),
        "variant": _variant(cfg, (extra.get("int8") or {}).get("activations")),
        "precision": {32: "fp32", 16: "fp16", 8: "int8"}[int(cfg.quantize)],
        "task": "detect",
        "names": {str(k): v for k, v in sorted(src.names.items())},
        "imgsz": [imgsz, imgsz],
        "stride": 32,
        **io,
        "preprocess": {**inputs.PREPROCESS, "size": [imgsz, imgsz]},
        "output_layout": f"(1, 4 + {nc}, anchors): cx, cy, w, h in input pixels, then {nc} "
        "class scores (sigmoid applied); no objectness",
        "nms": {"inside": False, "conf": float(cfg.conf), "iou": float(cfg.iou)},
        "source": {
            "checkpoint": str(src.checkpoint),
            "checkpoint_sha256": src.sha256,
            "run": src.run_dir.name if src.run_dir else None,
            "round": src.round,
            "data_version": src.data_version,
        },
        "heldout_data": str(src.heldout) if src.heldout else None,
        "gates": {"passed": report["passed"], "report": "gates.json"},
        **extra,
        "exporter": f"ultralytics {ultralytics.__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check(bundle: Path, cfg) -> dict:
    """Re-run the gates of an existing bundle against its source checkpoint.

    The model file must still have the sha256 in model.json; the gates are computed afresh.
    Updates model.json's status and gates.json; returns the report.
    """
    bundle = Path(bundle)
    meta = json.loads((bundle / "model.json").read_text())
    final = bundle / meta["file"]
    src = source_of(Path(meta["source"]["checkpoint"]), meta.get("heldout_data"))
    if src.sha256 != meta["source"]["checkpoint_sha256"]:
        raise EdgeError(f"check: {src.checkpoint} changed since the export (sha256 differs)")
    work = bundle / ".work"
    report = gates(
        src,
        final,
        cfg,
        meta["imgsz"][0],
        meta["precision"],
        work,
        parity_check=meta["format"] == "onnx",  # as at export: ONNX Runtime runs ONNX only
    )
    shutil.rmtree(work, ignore_errors=True)
    report["file_sha256_matches"] = sha256(final) == meta["sha256"]
    report["passed"] = report["passed"] and report["file_sha256_matches"]
    meta["status"] = "accepted" if report["passed"] else "rejected"
    meta["gates"]["passed"] = report["passed"]
    (bundle / "gates.json").write_text(json.dumps(report, indent=1))
    (bundle / "model.json").write_text(json.dumps(meta, indent=1))
    return report
