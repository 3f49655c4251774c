"""INT8 with ONNX Runtime's static quantization, calibrated centrally or federatedly.

**Which INT8.** Ultralytics' exporter quantizes ONNX with ``quantize_static``'s defaults:
signed 8-bit activations and per-tensor weights. On a 2-core x86 CPU that ran *slower* than
fp32, while unsigned activations with signed per-channel weights (ONNX Runtime's
"U8S8" kernels) ran faster (``benchmarks/edge.py``). So the choice is a setting
(``int8.activations``: ``u8`` | ``s8`` | ``auto``, where ``auto`` builds both, times both on this
machine and keeps the faster one that passes the gates), and ``model.json`` records it.

**What is quantized** (``int8.ops``). ``weighted``: only weighted operators (Conv, Gemm,
MatMul), as in Ultralytics' ``onnx_int8_quantize``. ``all``: every operator but the detection
head's decode (:func:`decode_nodes`), so INT8 flows through the activations (SiLU's Sigmoid and
Mul), the residual Adds, Concats, pooling and resizing instead of being dequantized after every
Conv: on this 2-core x86 CPU (AVX-512 VNNI) a YOLOv8n at 320 px ran 1.54× faster than fp32 ONNX
this way and 1.06× with ``weighted`` (random weights, ``benchmarks/edge.py`` measures a trained
model with its gates). ``auto`` builds both and keeps the faster one that passes the gates. The
decode stays float either way, because one INT8 scale that spans box pixels (0..imgsz) and class
probabilities (0..1) would round every score to 0. One Conv is decode too: the DFL layer, a
fixed 1×1 convolution with weights 0, 1, ..., reg_max-1 that takes the expectation of each box
side's distribution. Quantized, it cost a YOLOv8n 0.011 held-out mAP50-95 (0.1436 → 0.1327);
kept float, 0.1440, for 0 bytes and no measurable time (:func:`decode_convs`; in a bundle it is
a MatMul, as :func:`dfl_last_axis` leaves it).

**Calibration.** Activation ranges are ONNX Runtime's MinMax ranges (``create_calibrator``).
The ranges of a set of images are the element-wise min and max over its parts, so a client can
compute ranges on its own images and send only those numbers (two floats per tensor, no image);
the server merges them (:func:`merge_ranges`) and quantizes with the merged ranges through
``quantize_static(calibration_cache_path=...)``. Calibration never uses the held-out set the
gates evaluate on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deploy.edge import EdgeError
from deploy.edge.inputs import batches
from fl_client.lazy import lazy

onnx = lazy("onnx")
quantization = lazy("onnxruntime.quantization")
calibrate = lazy("onnxruntime.quantization.calibrate")

LOGGER = logging.getLogger("fedyolo")

ACTIVATIONS = ("u8", "s8")
OPS = ("weighted", "all")  # int8.ops: which operators are quantized
QUANTIZED_OPS = frozenset({"Conv", "Gemm", "MatMul"})  # ops=weighted
_MODULE = re.compile(r"^/model\.(\d+)/")  # Ultralytics' node names: /model.<module index>/...


def decode_convs(model) -> list[str]:
    """Nodes whose weight is a fixed arange over the channels: DFL's expectation, a 1×1 Conv as
    Ultralytics exports it, or the MatMul :func:`dfl_last_axis` makes of it."""
    inits = {i.name: i for i in model.graph.initializer}
    names = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        conv = n.op_type == "Conv" and len(w.dims) == 4 and w.dims[0] == 1 and w.dims[2:] == [1, 1]
        if conv or (n.op_type == "MatMul" and len(w.dims) == 2 and w.dims[1] == 1):
            a = onnx.numpy_helper.to_array(w).reshape(-1)
            if np.array_equal(a, np.arange(a.size, dtype=a.dtype)):
                names.append(n.name)
    return names


def dfl_last_axis(path: Path) -> bool:
    """Rewrite the ONNX file at ``path`` so that its DFL decode works on the last axis:
    Ultralytics exports Transpose(0,2,1,3) → Softmax(axis=1) → Conv(1×1, weights 0..N-1) on
    [1, N, 4, anchors], a softmax ONNX Runtime transposes around (2.2 ms of a YOLOv8n's 31 at
    320 px on an AVX2 CPU); this makes it Transpose(0,1,3,2) → Softmax(-1) → MatMul([N, 1]),
    the same numbers in the same order (``benchmarks/int8_profile.py``: identical outputs,
    1.06× faster). False, and the file unchanged, where the graph is not that."""
    m = onnx.load(str(path))
    g = m.graph
    by_output = {o: n for n in g.node for o in n.output}
    decode = set(decode_convs(m))
    convs = [n for n in g.node if n.name in decode and n.op_type == "Conv"]
    if len(convs) != 1:
        return False
    conv = convs[0]
    softmax = by_output.get(conv.input[0])
    transpose = by_output.get(softmax.input[0]) if softmax is not None else None
    attr = onnx.helper.get_attribute_value
    if (
        transpose is None
        or (softmax.op_type, transpose.op_type) != ("Softmax", "Transpose")
        or [attr(a) for a in softmax.attribute if a.name == "axis"] != [1]
        or [attr(a) for a in transpose.attribute if a.name == "perm"] != [[0, 2, 1, 3]]
        or len(conv.input) != 2  # no bias
        or any(attr(a) != 1 for a in conv.attribute if a.name == "group")
        or {n.op_type for n in g.node if conv.output[0] in n.input} != {"Reshape"}
    ):
        return False
    weight = next(t for t in g.initializer if t.name == conv.input[1])
    del transpose.attribute[:]
    transpose.attribute.append(onnx.helper.make_attribute("perm", [0, 1, 3, 2]))
    del softmax.attribute[:]
    softmax.attribute.append(onnx.helper.make_attribute("axis", -1))
    projection = onnx.numpy_helper.to_array(weight).reshape(-1, 1)
    name = f"{conv.input[1]}.projection"
    g.initializer.append(onnx.numpy_helper.from_array(projection, name))
    matmul = onnx.helper.make_node("MatMul", [softmax.output[0], name], [conv.output[0]])
    matmul.name = conv.name
    g.node.insert(list(g.node).index(conv), matmul)
    g.node.remove(conv)
    if not any(weight.name in n.input for n in g.node):
        g.initializer.remove(weight)
    changed = {transpose.output[0], softmax.output[0], conv.output[0]}
    keep = [v for v in g.value_info if v.name not in changed]  # their shapes are new
    del g.value_info[:]
    g.value_info.extend(keep)
    onnx.save(m, str(path))  # checked as every export is: its parity and accuracy gates
    return True


def decode_nodes(model) -> list[str]:
    """The detection head's decode: the DFL conv (:func:`decode_convs`) and every node of the
    last module (Ultralytics' ``Detect``) outside its conv branches (``cv2.*``, ``cv3.*``, ...):
    the reshapes and concatenation of the raw outputs, DFL's softmax, the class sigmoid and the
    box arithmetic. A graph without Ultralytics' module names gives the DFL conv alone."""
    indices = [int(m.group(1)) for n in model.graph.node if (m := _MODULE.match(n.name))]
    names = decode_convs(model)
    if not indices:
        return names
    head = f"/model.{max(indices)}/"
    for n in model.graph.node:
        if not n.name.startswith(head) or n.name in names:
            continue
        first, *rest = n.name[len(head) :].split("/")
        if not rest or first == "dfl":  # a direct node of the head, or the DFL's
            names.append(n.name)
    return names


def input_name(onnx_path: Path) -> str:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


class ImageReader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over image files."""

    def __init__(self, name: str, paths: Sequence[Path], imgsz: int):
        self.name, self.paths, self.imgsz = name, list(paths), imgsz
        self._it = iter(batches(self.paths, imgsz))

    def get_next(self) -> dict | None:
        x = next(self._it, None)
        return None if x is None else {self.name: x}

    def __len__(self) -> int:
        return len(self.paths)


def activation_ranges(onnx_path: Path, images: Sequence[Path], imgsz: int) -> dict:
    """MinMax ranges of every float tensor of ``onnx_path`` over ``images``.

    ``{"images": n, "ranges": {tensor: [lowest, highest]}}``: JSON, no pixels. This is what a
    client computes on its own images in federated calibration.
    """
    if not images:
        raise EdgeError("calibration: no images")
    with tempfile.TemporaryDirectory(prefix="fedyolo-calib-") as tmp:
        cal = calibrate.create_calibrator(
            Path(onnx_path),
            None,  # every float tensor, as quantize_static calibrates them
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=calibrate.CalibrationMethod.MinMax,
            providers=["CPUExecutionProvider"],
        )
        cal.collect_data(ImageReader(input_name(onnx_path), images, imgsz))
        data = cal.compute_data()
        del cal
    ranges = {k: [_floats(v.range_value[0]), _floats(v.range_value[1])] for k, v in data.items()}
    return {"images": len(images), "ranges": ranges}


def _floats(a) -> list[float]:
    """A range end as JSON: a list of one float (per-tensor) or of one per channel."""
    return np.asarray(a, dtype=np.float64).reshape(-1).tolist()


def merge_ranges(parts: Sequence[dict]) -> dict:
    """The ranges of the union of the parts' images: per tensor, the min of the lows and the max
    of the highs. Parts of another model (other tensors) are refused."""
    if not parts:
        raise EdgeError("calibration: no client sent activation ranges")
    names = set(parts[0]["ranges"])
    for i, p in enumerate(parts[1:], 1):
        if set(p["ranges"]) != names:
            raise EdgeError(
                f"calibration: part {i} has ranges for other tensors than part 0 "
                "(computed on another model?)"
            )
    merged = {}
    for k in parts[0]["ranges"]:
        lows = np.array([p["ranges"][k][0] for p in parts], dtype=np.float64)
        highs = np.array([p["ranges"][k][1] for p in parts], dtype=np.float64)
        if not (np.isfinite(lows).all() and np.isfinite(highs).all()):
            raise EdgeError(f"calibration: tensor {k!r} has a non-finite range in some part")
        merged[k] = [_floats(lows.min(axis=0)), _floats(highs.max(axis=0))]
    return {"images": sum(int(p["images"]) for p in parts), "ranges": merged}


def quantize(
    fp32_onnx: Path,
    out: Path,
    ranges: dict,
    *,
    activations: str = "u8",
    per_channel: bool = True,
    ops: str = "weighted",
) -> Path:
    """An INT8 (QDQ) copy of ``fp32_onnx`` at ``out``, quantized with the given ``ranges``.

    The fp32 file's metadata (Ultralytics' names, stride, imgsz) is kept, so Ultralytics'
    ``YOLO(out)`` loads, predicts and validates the INT8 file like the fp32 one.
    """
    if activations not in ACTIVATIONS:
        raise EdgeError(f"int8.activations: {activations!r} is not one of {', '.join(ACTIVATIONS)}")
    if ops not in OPS:
        raise EdgeError(f"int8.ops: {ops!r} is not one of {', '.join(OPS)}")
    source = onnx.load(str(fp32_onnx))
    if ops == "weighted":
        exclude = [n.name for n in source.graph.node if n.op_type not in QUANTIZED_OPS]
        exclude += decode_convs(source)
    else:
        exclude = decode_nodes(source)
    data = {
        k: (np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32))
        for k, (lo, hi) in ranges["ranges"].items()
    }
    qtype = quantization.QuantType
    with tempfile.TemporaryDirectory(prefix="fedyolo-quant-") as tmp, _quiet_root():
        cache = Path(tmp) / "ranges.json"
        calibrate.save_tensors_data(
            calibrate.TensorsData(calibrate.CalibrationMethod.MinMax, data), cache
        )
        quantization.quantize_static(
            str(fp32_onnx),
            str(out),
            None,
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=qtype.QUInt8 if activations == "u8" else qtype.QInt8,
            weight_type=qtype.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=calibrate.CalibrationMethod.MinMax,
            calibration_cache_path=cache,
        )
    model = onnx.load(str(out))
    have = {p.key for p in model.metadata_props}
    for p in source.metadata_props:
        if p.key not in have:
            model.metadata_props.add(key=p.key, value=p.value)
    onnx.save(model, str(out))
    return out


@contextlib.contextmanager
def _quiet_root():
    """ONNX Runtime's quantizer logs advice through the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def write_ranges(path: Path, ranges: dict) -> Path:
    path.write_text(json.dumps(ranges, indent=1))
    return path
