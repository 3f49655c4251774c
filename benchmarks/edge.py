"""The edge pipeline measured: a federated YOLOv8n exported to ONNX fp32/fp16/INT8 (unsigned and
signed activations), gated, and benchmarked over image sizes and thread counts.

    python benchmarks/edge.py --train            # train the 320 px federation first (~15 min)
    python benchmarks/edge.py --run DIR          # or use a finished run directory

Targets (issue 17, this machine): INT8 ONNX >= 3x smaller and >= 1.3x faster at p50 than fp32
ONNX at 320 px, with <= 0.01 held-out mAP50-95 lost. With OpenVINO installed ('fedyolo[openvino]',
part of the dev set) every ONNX file is also run in OpenVINO's CPU plugin (issue 33 item 2: its
INT8 path beside ONNX Runtime's, on the same INT8 file) and an OpenVINO bundle (`fedyolo export
format=openvino`) is exported and measured. Writes benchmarks/results/edge.json and prints the
README's table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks_common import RESULTS, WORK, fedyolo_run, machine, repo_path  # noqa: E402

TRAIN = [
    "model=yolov8n",
    "federation.clients=2",
    "data.synth.imgsz=320",
    "train.imgsz=320",
    "tracking.enabled=false",
]
VARIANTS = [  # (label, export overrides)
    ("fp32", ["quantize=32"]),
    ("fp16", ["quantize=16"]),
    ("int8-u8", ["quantize=8", "int8.activations=u8"]),
    ("int8-s8", ["quantize=8", "int8.activations=s8"]),
]
OPENVINO_VARIANTS = [("openvino-fp32", ["format=openvino"])]  # with the openvino package


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=WORK / "runs" / "edge320")
    ap.add_argument("--train", action="store_true", help="train the run first")
    ap.add_argument("--rounds", type=int, default=10, help="the training's rounds (--train)")
    ap.add_argument("--sizes", default="320,640")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--out", type=Path, default=RESULTS / "edge.json")
    ap.add_argument(
        "--reuse", action="store_true", help="benchmark the bundles already exported (no export)"
    )
    args = ap.parse_args()

    import importlib.util

    from deploy.edge import bench, export, settings

    openvino = importlib.util.find_spec("openvino") is not None

    if args.train:
        args.run = fedyolo_run(args.run.name, [*TRAIN, f"federation.rounds={args.rounds}"])
    train = [f"{k}={v}" for k, v in _trained_with(args.run).items()]  # what the run ran with
    best = args.run / "best.pt"
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    bundles, exports = [], []
    for imgsz in sizes:
        for label, over in VARIANTS + (OPENVINO_VARIANTS if openvino else []):
            out = WORK / "edge" / f"{label}-{imgsz}"
            if args.reuse and (out / "model.json").is_file():
                meta = json.loads((out / "model.json").read_text())
            else:
                meta = export.export(
                    best, settings.load("export", [*over, f"imgsz={imgsz}", f"out={out}"])
                )
            gates = json.loads((out / "gates.json").read_text())
            exports.append(
                {
                    "variant": label,
                    "imgsz": imgsz,
                    "status": meta["status"],
                    "size_bytes": meta["size_bytes"],
                    "seconds": meta.get("export_seconds"),
                    "gates": gates,
                    "int8": meta.get("int8"),
                }
            )
            print(f"{label} {imgsz}: {meta['status']}, {meta['size_bytes'] / 1e6:.2f} MB")
            bundles.append(out)
    cfg = settings.load(
        "bench",
        [
            f"imgsz={sizes}",
            f"threads={threads}",
            f"runtimes={['onnxruntime', 'openvino'] if openvino else ['onnxruntime']}",
            f"runs={args.runs}",
            f"out={WORK / 'edge'}",
            f"data={args.run / 'data' / 'server_val' / 'data.yaml'}",
        ],
    )
    report = bench.bench([best, *bundles], cfg)
    rows = report["results"]

    def row(model, imgsz, t):
        return next(
            r for r in rows if r["model"] == model and r["imgsz"] == imgsz and r["threads"] == t
        )

    t_max, at = max(threads), 320 if 320 in sizes else sizes[0]
    fp32, u8, s8 = (
        row("onnx-fp32", at, t_max),
        row("onnx-int8-u8", at, t_max),
        row("onnx-int8-s8", at, t_max),
    )
    targets = {
        "imgsz": at,
        "threads": t_max,
        "int8_u8_smaller_x": round(fp32["size_mb"] / u8["size_mb"], 2),
        "int8_u8_faster_p50_x": round(fp32["p50_ms"] / u8["p50_ms"], 2),
        "int8_s8_faster_p50_x": round(fp32["p50_ms"] / s8["p50_ms"], 2),
        "int8_u8_map_drop": round(fp32["map50_95"] - u8["map50_95"], 4),
        "pt_map50_95": row("best.pt", at, t_max)["map50_95"],
        # which operators the kept INT8 quantizes (int8.ops=auto chose it on this machine)
        "int8_u8_ops": next(
            (e["int8"] or {}).get("ops")
            for e in exports
            if e["variant"] == "int8-u8" and e["imgsz"] == at
        ),
    }
    if openvino:  # OpenVINO's CPU plugin on the same files, against ONNX Runtime's fp32
        ov_fp32 = row("onnx-fp32 · openvino", at, t_max)
        ov_u8 = row("onnx-int8-u8 · openvino", at, t_max)
        targets["openvino"] = {
            "version": report["machine"].get("openvino"),
            "fp32_precision": ov_fp32.get("precision"),
            "int8_precision": ov_u8.get("precision"),
            "fp32_p50_ms": ov_fp32["p50_ms"],
            "int8_u8_p50_ms": ov_u8["p50_ms"],
            "int8_u8_faster_p50_x_vs_ort_fp32": round(fp32["p50_ms"] / ov_u8["p50_ms"], 2),
            "int8_u8_faster_p50_x_vs_ort_int8": round(u8["p50_ms"] / ov_u8["p50_ms"], 2),
            "fp32_faster_p50_x_vs_ort_fp32": round(fp32["p50_ms"] / ov_fp32["p50_ms"], 2),
            "int8_u8_map_drop": round(fp32["map50_95"] - ov_u8["map50_95"], 4),
            "fp32_map_drop": round(fp32["map50_95"] - ov_fp32["map50_95"], 4),
        }
    targets["met"] = (
        targets["int8_u8_smaller_x"] >= 3
        and targets["int8_u8_faster_p50_x"] >= 1.3
        and row("best.pt", at, t_max)["map50_95"] - u8["map50_95"] <= 0.01
    )
    result = {
        "benchmark": "edge",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "run": repo_path(args.run),
        "train": train,
        "exports": exports,
        "bench": report,
        "targets": targets,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(bench.table(rows))
    print(json.dumps(targets, indent=1))
    return 0


def _trained_with(run: Path) -> dict:
    """The settings of a finished run that decide the model (its config.yaml)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    keys = ("model.cfg", "federation.clients", "federation.rounds", "data.synth.imgsz")
    keys += ("train.imgsz", "train.epochs", "train.batch", "train.lr0", "train.lr_schedule")
    return {k: OmegaConf.select(cfg, k) for k in keys}


if __name__ == "__main__":
    sys.exit(main())
