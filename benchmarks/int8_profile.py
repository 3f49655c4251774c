"""Where INT8 time goes: ONNX Runtime's profiler on the edge benchmark's fp32 and INT8 files.

Issue 33 item 2 asks which operators and layouts ONNX Runtime runs fastest in INT8, measured per
node. This runs both files of `benchmarks/edge.py` (its `fp32-320` and `int8-u8-320` bundles) with
ONNX Runtime's profiler on, sums each operator type's kernel time per inference, and pairs the
convolutions layer by layer (Conv against QLinearConv). Then it re-quantizes the fp32 file with
the quantizer settings that decide the kernels (QDQ or QOperator, per-channel or per-tensor,
signed or unsigned weights, 7-bit weights) and times each against the fp32 file, in alternation.
Those copies are calibrated on random images: their speed is the kernels', their accuracy means
nothing and is not measured (the edge benchmark's gates measure the product's INT8 file).

``decode_rewrite``: Ultralytics' exporter puts the box decode's DFL softmax over axis 1 of a
[1, 16, 4, anchors] tensor, which ONNX Runtime transposes around. Rewritten by
``deploy.edge.quantize.dfl_last_axis`` (a softmax over the last axis of [1, 4, anchors, 16], the
fixed 1x1 convolution as a MatMul; ``fedyolo export`` does this since 2026-12-06), the outputs
are compared with the file's and both are timed in alternation. A file exported with it already
is recorded as such.

    .venv/bin/python benchmarks/int8_profile.py --out int8_profile_avx2.json

Writes benchmarks/results/<out> (the CPU named: INT8 kernels depend on its instructions).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks_common import RESULTS, WORK, code_commit, machine, repo_path  # noqa: E402

from deploy.edge.bench import ort_session  # noqa: E402

EDGE = WORK / "edge"
IMGSZ = 320
# (label, quantize_static arguments): the settings that pick ONNX Runtime's INT8 kernels
QUANTIZERS = {
    "QDQ, per-channel, u8 activations, s8 weights (fedyolo's)": {},
    "QDQ, per-tensor": {"per_channel": False},
    "QOperator, per-channel": {"quant_format": "QOperator"},
    "QDQ, u8 weights": {"weight_type": "QUInt8"},
    "QDQ, 7-bit weights (reduce_range)": {"reduce_range": True},
}


def _inputs(session) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    return {session.get_inputs()[0].name: x}


def p50_ms(path: Path, threads: int, runs: int) -> float:
    """Median latency of ``runs`` inferences after 10 warm-up ones, profiler off."""
    import numpy as np

    s = ort_session(path, threads)
    feed = _inputs(s)
    for _ in range(10):
        s.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1e3, 3)


def profile(path: Path, threads: int, runs: int, tmp: Path) -> dict:
    """Kernel milliseconds per inference: by operator type, and by convolution layer."""
    s = ort_session(path, threads, str(tmp / path.stem))
    feed = _inputs(s)
    for _ in range(runs):
        s.run(None, feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    by_conv: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] += e["dur"]
        count[op] += 1
        if op in ("Conv", "QLinearConv") and "/conv/" in e["name"]:
            by_conv[e["name"].split("/conv/")[0]] += e["dur"]
    per = runs * 1e3  # microseconds over all runs -> milliseconds per inference
    return {
        "by_op": {
            op: {"ms": round(us / per, 3), "nodes": count[op] // runs}
            for op, us in by_op.most_common()
        },
        "by_conv_layer": {k: round(us / per, 3) for k, us in by_conv.most_common()},
        "kernels_ms": round(sum(by_op.values()) / per, 3),
    }


def requantize(fp32: Path, out: Path, settings: dict) -> Path:
    """``fp32`` quantized like fedyolo's INT8 (``int8.ops=all``: all but the decode) with
    ``settings`` changed, calibrated on random images (speed only)."""
    import numpy as np
    import onnx
    from onnxruntime import quantization as q

    from deploy.edge.quantize import _quiet_root, decode_nodes

    rng = np.random.default_rng(1)
    batches = iter([{"images": rng.random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)}] * 4)

    class Reader(q.CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    kw = {
        "quant_format": q.QuantFormat.QDQ,
        "per_channel": True,
        "activation_type": q.QuantType.QUInt8,
        "weight_type": q.QuantType.QInt8,
    }
    enums = {"quant_format": q.QuantFormat, "weight_type": q.QuantType}  # named in JSON
    kw.update({k: getattr(enums[k], v) if k in enums else v for k, v in settings.items()})
    with _quiet_root():
        q.quantize_static(
            str(fp32), str(out), Reader(), nodes_to_exclude=decode_nodes(onnx.load(str(fp32))), **kw
        )
    return out


def decode_rewrite(fp32: Path, tmp: Path, threads: int, runs: int) -> dict:
    import numpy as np

    from deploy.edge.quantize import dfl_last_axis

    fast = tmp / "dfl-last-axis.onnx"
    shutil.copy(fp32, fast)
    if not dfl_last_axis(fast):
        return {"skipped": "the file's DFL decode is on the last axis already (exported so)"}
    a, b = ort_session(fp32, threads), ort_session(fast, threads)
    feed = _inputs(a)
    diff = float(np.abs(a.run(None, feed)[0] - b.run(None, feed)[0]).max())
    pairs = [(p50_ms(fp32, threads, runs), p50_ms(fast, threads, runs)) for _ in range(3)]
    before = sum(p[0] for p in pairs) / 3
    after = sum(p[1] for p in pairs) / 3
    return {
        "max_abs_output_difference": diff,
        "fp32_p50_ms": round(before, 3),
        "rewritten_p50_ms": round(after, 3),
        "faster_x": round(before / after, 3),
        "pairs_ms": pairs,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", type=Path, default=EDGE / f"fp32-{IMGSZ}" / "model.onnx")
    ap.add_argument("--int8", type=Path, default=EDGE / f"int8-u8-{IMGSZ}" / "model-int8.onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--out", default="int8_profile.json")
    args = ap.parse_args()
    for f in (args.fp32, args.int8):
        if not f.is_file():
            sys.exit(f"{f}: not found; run benchmarks/edge.py first (it exports both files)")

    import onnxruntime as ort

    result = {
        "benchmark": "int8_profile",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "code": code_commit(),
        "onnxruntime": ort.__version__,
        "imgsz": IMGSZ,
        "threads": args.threads,
        "runs": args.runs,
        "files": {"fp32": repo_path(args.fp32), "int8": repo_path(args.int8)},
    }
    with tempfile.TemporaryDirectory(prefix="fedyolo-int8-profile-") as tmp:
        tmp = Path(tmp)
        result["p50_ms"] = {
            k: p50_ms(f, args.threads, args.runs)
            for k, f in (("fp32", args.fp32), ("int8", args.int8))
        }
        result["profile"] = {
            k: profile(f, args.threads, args.runs, tmp)
            for k, f in (("fp32", args.fp32), ("int8", args.int8))
        }
        rows = []
        for label, settings in QUANTIZERS.items():
            out = requantize(args.fp32, tmp / f"q{len(rows)}.onnx", settings)
            fp32 = [p50_ms(args.fp32, args.threads, args.runs) for _ in range(2)]
            int8 = [p50_ms(out, args.threads, args.runs) for _ in range(2)]
            fp32_ms, int8_ms = sum(fp32) / 2, sum(int8) / 2
            rows.append(
                {
                    "quantizer": label,
                    "settings": settings,
                    "fp32_p50_ms": round(fp32_ms, 3),
                    "int8_p50_ms": round(int8_ms, 3),
                    "faster_x": round(fp32_ms / int8_ms, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        result["quantizers"] = rows
        result["decode_rewrite"] = decode_rewrite(args.fp32, tmp, args.threads, args.runs)
        print(json.dumps(result["decode_rewrite"]), flush=True)
    path = RESULTS / args.out
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
