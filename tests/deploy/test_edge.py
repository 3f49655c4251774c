"""The edge pipeline on a real (tiny) federated run: export, bundle, gates, INT8, bench."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inprocess import run_inprocess  # noqa: E402

from deploy.edge import EdgeError, inputs, settings  # noqa: E402
from deploy.edge import export as ex  # noqa: E402
from deploy.edge import quantize as q  # noqa: E402

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pretrained_fleet) -> Path:
    """A finished 2-client, 2-round tiny federation: best.pt, manifest, shards, server_val.

    It starts from conftest's pre-trained tiny model: a tiny model trained from scratch for two
    rounds gives the same output for any input (measured: zeros, noise and stripes within 2e-8
    of each other), so every comparison of two runtimes below would compare constants."""
    from flwr.supercore.task_identity import TaskIdentity

    tmp = tmp_path_factory.mktemp("edge")
    with pytest.MonkeyPatch.context() as mp:  # what conftest's _task_identity does per test
        for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            mp.setattr(TaskIdentity, attr, value)
        run, _ = run_inprocess(
            tmp, [*pretrained_fleet, "federation.rounds=2"], clients=2, name="edge"
        )
    assert run.best.is_file()
    return run.path


def raw_outputs(run_dir: Path, model: Path, imgsz: int, n: int = 2) -> list[np.ndarray]:
    """The raw outputs of ``model`` (ONNX Runtime, or the PyTorch checkpoint for a ``.pt``) on
    the first ``n`` held-out images, in float64."""
    import torch

    from deploy.edge.bench import onnx_runner, torch_runner

    threads = torch.get_num_threads()  # torch_runner sets it for the whole process
    run = torch_runner(model, threads) if model.suffix == ".pt" else onnx_runner(model, threads)[0]
    images = inputs.image_files(run_dir / "data" / "server_val")[:n]
    return [run(inputs.load(i, imgsz))[0].astype(np.float64) for i in images]


def between_images(outputs: list[np.ndarray]) -> float:
    """How far one model's raw outputs move from one real image to the next: the scale any
    difference between two runtimes of the same model is measured against."""
    return float(np.abs(outputs[0] - outputs[1]).max())


@pytest.fixture(scope="module")
def fp32_bundle(run_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bundle") / "fp32"
    meta = ex.export(run_dir / "best.pt", settings.load("export", [f"out={out}"]))
    return out, meta


def test_fp32_bundle_describes_the_model_it_holds(run_dir, fp32_bundle):
    import onnxruntime as ort
    from ultralytics import YOLO

    out, meta = fp32_bundle
    assert meta["status"] == "accepted", (out / "gates.json").read_text()
    model = out / meta["file"]
    assert meta["sha256"] == ex.sha256(model) and meta["size_bytes"] == model.stat().st_size
    ckpt = YOLO(str(run_dir / "best.pt"))
    assert meta["names"] == {str(k): v for k, v in ckpt.names.items()}
    imgsz = int(ckpt.ckpt["train_args"]["imgsz"])
    assert meta["imgsz"] == [imgsz, imgsz]
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert meta["inputs"] == [{"name": inp.name, "shape": [1, 3, imgsz, imgsz], "type": inp.type}]
    assert meta["outputs"][0]["name"] == outp.name
    assert meta["outputs"][0]["shape"] == list(outp.shape)
    assert outp.shape[1] == 4 + len(ckpt.names)  # boxes + class scores, NMS outside
    assert meta["nms"]["inside"] is False
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert meta["source"]["data_version"] == manifest["data"]["data_version"]
    assert meta["source"]["checkpoint_sha256"] == ex.sha256(run_dir / "best.pt")
    gates = json.loads((out / "gates.json").read_text())
    parity = next(c for c in gates["checks"] if c["gate"] == "parity")
    assert parity["passed"] and parity["max_abs_diff"] <= parity["threshold"]
    # the parity gate compares a model that sees its input: two held-out images move its
    # outputs far more than the gate's threshold (a constant model passes any parity gate)
    torch_out = raw_outputs(run_dir, run_dir / "best.pt", imgsz)
    assert between_images(torch_out) > 10 * parity["threshold"], between_images(torch_out)
    acc = next(c for c in gates["checks"] if c["gate"] == "accuracy")
    assert acc["data"].endswith("server_val/data.yaml")
    # the bundle's preprocessing reproduces the parity numbers: ONNX Runtime on inputs.load()
    x = inputs.load(inputs.image_files(run_dir / "data" / "server_val")[0], imgsz)
    (y,) = sess.run(None, {inp.name: x})
    assert y.shape == tuple(outp.shape) and np.isfinite(y).all()
    # and Ultralytics runs the file as it is, metadata included
    res = YOLO(str(model), task="detect").predict(
        inputs.image_files(run_dir / "data" / "server_val")[0], imgsz=imgsz, verbose=False
    )
    assert res[0].names == ckpt.names


def test_the_runs_reported_map_is_its_checkpoints(run_dir, tmp_path):
    """Re-evaluating best.pt on the held-out set gives the mAP50-95 the run reported, on a model
    that detects something (the e2e tests check the same on runs whose tiny model may score 0,
    where any two evaluations agree)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
    from e2e_helpers import check_best_reevaluates

    assert check_best_reevaluates(run_dir, tmp_path, imgsz=128)["map50_95"] > 0


def test_corrupted_export_fails_its_parity_gate(fp32_bundle, tmp_path, capsys):
    import shutil

    import onnx
    from onnx import numpy_helper

    from fl_server.cli import main

    src, _ = fp32_bundle
    bundle = tmp_path / "corrupt"
    shutil.copytree(src, bundle)
    meta = json.loads((bundle / "model.json").read_text())
    model = onnx.load(str(bundle / meta["file"]))
    # the head's last convolutions (box distributions, class logits) with their weights and
    # biases' signs flipped
    heads = [n for n in model.graph.node if n.op_type == "Conv" and n.name.endswith(".2/Conv")]
    assert len(heads) == 6, [n.name for n in heads]
    inits = {i.name: i for i in model.graph.initializer}
    for conv in heads:
        for name in conv.input[1:]:
            t = inits[name]
            t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    onnx.save(model, str(bundle / meta["file"]))

    assert main(["export", str(bundle), "--check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "rejected" in err[0] and "parity max |diff|" in err[0], err
    assert json.loads((bundle / "model.json").read_text())["status"] == "rejected"
    report = json.loads((bundle / "gates.json").read_text())
    assert report["passed"] is False and report["file_sha256_matches"] is False
    # the untouched bundle still passes the same check
    assert main(["export", str(src), "--check"]) == 0


def test_int8_export_is_calibrated_federatedly_and_runs(run_dir, tmp_path):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "int8"
    meta = ex.export(
        run_dir / "best.pt",
        settings.load("export", [f"out={out}", "quantize=8", "int8.activations=auto"]),
    )
    model = out / meta["file"]
    ops = {n.op_type for n in onnx.load(str(model)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    i8 = meta["int8"]
    assert i8["activations"] in ("u8", "s8") and i8["weights"] == "s8"
    assert i8["ops"] in ("weighted", "all")
    tried = {f"{o}-{a}" for o in ("weighted", "all") for a in ("u8", "s8")}
    assert set(i8["choice"]["measured_p50_ms"]) == {"fp32", *tried}
    cal = i8["calibration"]
    assert cal["method"] == "federated" and len(cal["parts"]) == 2
    for part in cal["parts"]:
        assert part["images_from"].endswith("/train") and "server_val" not in part["images_from"]
    assert cal["images"] == sum(c["images"] for c in cal["parts"])
    ranges = json.loads((out / "calibration.json").read_text())
    assert ranges["images"] == cal["images"] and ranges["ranges"]
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    imgsz = meta["imgsz"][0]
    x = inputs.load(inputs.image_files(run_dir / "data" / "server_val")[0], imgsz)
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x})
    assert y.shape == tuple(meta["outputs"][0]["shape"]) and np.isfinite(y).all()
    assert meta["size_bytes"] < 0.5 * (run_dir / "best.pt").stat().st_size
    # INT8 computes the fp32 model's function: on each held-out image its raw outputs sit closer
    # to fp32's than fp32's own outputs for the next image do (measured here: 27 px against 122)
    fp32 = raw_outputs(run_dir, run_dir / "best.pt", imgsz)
    int8 = raw_outputs(run_dir, model, imgsz)
    moved = between_images(fp32)
    for a, b in zip(int8, fp32, strict=True):
        assert np.abs(a - b).max() < 0.5 * moved, (np.abs(a - b).max(), moved)
    # every Conv is INT8; the DFL decode (a MatMul on weights 0..reg_max-1) stays float: its
    # weight is no dequantized tensor
    graph = onnx.load(str(model)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    weighted = [n for n in graph.node if n.op_type in ("Conv", "MatMul")]
    float_weighted = [n.name for n in weighted if n.input[1] not in dequantized]
    assert len(float_weighted) == 1 and "dfl" in float_weighted[0], float_weighted


def test_int8_all_ops_quantizes_between_layers_but_not_the_decode(run_dir, fp32_bundle, tmp_path):
    """ops=all: the activations' inner outputs (SiLU's Sigmoid) are quantized too, no output of
    the head's decode (DFL, class sigmoid, box arithmetic) is; ops=weighted quantizes only what
    a weighted operator reads (a Conv's input), so no Sigmoid output."""
    import onnx

    out, meta = fp32_bundle
    src, imgsz = out / meta["file"], meta["imgsz"][0]
    images = inputs.image_files(run_dir / "data" / "client_0" / "train")[:4]
    ranges = q.activation_ranges(src, images, imgsz)
    decode = set(q.decode_nodes(onnx.load(str(src))))
    assert any("dfl" in d for d in decode) and any(d.endswith("/Sigmoid") for d in decode)
    assert not any("/cv2." in d or "/cv3." in d for d in decode)  # the head's convs are not

    def quantized_outputs(ops: str) -> dict[str, str]:
        """Node name → op type of every node whose output feeds a QuantizeLinear."""
        graph = onnx.load(str(q.quantize(src, tmp_path / f"{ops}.onnx", ranges, ops=ops))).graph
        into_q = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
        return {n.name: n.op_type for n in graph.node if set(n.output) & into_q}

    every = quantized_outputs("all")
    assert not decode & set(every)
    assert "Sigmoid" in every.values() and "Concat" in every.values()
    assert "Sigmoid" not in quantized_outputs("weighted").values()


def test_federated_ranges_are_the_pooled_ranges(run_dir, fp32_bundle):
    """Merging per-client MinMax ranges gives exactly the ranges of all images together."""
    out, meta = fp32_bundle
    model, imgsz = out / meta["file"], meta["imgsz"][0]
    a = inputs.image_files(run_dir / "data" / "client_0" / "train")[:6]
    b = inputs.image_files(run_dir / "data" / "client_1" / "train")[:6]
    merged = q.merge_ranges(
        [q.activation_ranges(model, a, imgsz), q.activation_ranges(model, b, imgsz)]
    )
    pooled = q.activation_ranges(model, a + b, imgsz)
    assert merged["images"] == 12 and merged["ranges"].keys() == pooled["ranges"].keys()
    for k, (lo, hi) in pooled["ranges"].items():
        assert merged["ranges"][k] == [lo, hi], k
    with pytest.raises(EdgeError, match="other tensors"):
        q.merge_ranges([merged, {"images": 1, "ranges": {"x": [[0.0], [1.0]]}}])


def test_dfl_decode_is_on_the_last_axis_and_found_as_decode(run_dir, fp32_bundle, tmp_path):
    """The bundle's DFL decode is Softmax(-1) → MatMul (``dfl_last_axis``, listed in model.json),
    still found as the decode; the rewrite gives the exporter's own file's outputs."""
    import shutil

    import onnx

    out, meta = fp32_bundle
    model = onnx.load(str(out / meta["file"]))
    (name,) = q.decode_convs(model)
    node = next(n for n in model.graph.node if n.name == name)
    assert "dfl" in name and node.op_type == "MatMul"
    assert meta["rewrites"] == ["dfl-softmax-last-axis"]
    assert not q.dfl_last_axis(out / meta["file"])  # once only: the graph is not that any more

    plain = tmp_path / "export"  # Ultralytics' own file, rewritten here: the same outputs
    exported = ex._ultralytics_export(
        ex.source_of(run_dir / "best.pt"), plain, settings.load("export", []), meta["imgsz"][0], 32
    )
    before = raw_outputs(run_dir, exported, meta["imgsz"][0])
    rewritten = tmp_path / "rewritten.onnx"
    shutil.copy(exported, rewritten)
    assert q.dfl_last_axis(rewritten)
    after = raw_outputs(run_dir, rewritten, meta["imgsz"][0])
    # the same function: any difference is float rounding (a sum in another order, a few ulps
    # of box pixels), far inside how much one image's outputs differ from the next's
    for a, b in zip(before, after, strict=True):
        assert np.abs(a - b).max() <= 1e-4 * between_images(before)


def test_bench_writes_its_table(run_dir, fp32_bundle, tmp_path, capsys):
    from fl_server.cli import main

    out, meta = fp32_bundle
    args = [f"out={tmp_path}", "runs=3", "warmup=1", "threads=[1]"]
    assert main(["bench", str(out), str(run_dir / "best.pt"), *args]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["results"]
    assert [r["model"] for r in rows] == ["onnx-fp32", "best.pt"]
    for r in rows:
        assert r["p50_ms"] > 0 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["peak_rss_mb"] > 50 and r["size_mb"] > 0
    # by default every model runs at the bundle's size, and each row has its mAP (the
    # checkpoint's from the bundle's held-out set): the same model, so the same figure
    assert {r["imgsz"] for r in rows} == {meta["imgsz"][0]}, rows
    assert None not in [r["map50_95"] for r in rows], rows
    assert abs(rows[0]["map50_95"] - rows[1]["map50_95"]) <= 0.02 + 0.1 * rows[1]["map50_95"]
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("| model |") and md.count("\n") == 4
    assert md in printed
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_runs_an_onnx_file_in_openvino_too_and_an_openvino_bundle(run_dir, fp32_bundle,
                                                                        tmp_path):  # fmt: skip
    """``runtimes=[onnxruntime,openvino]``: the same ONNX file timed and validated in each
    runtime (the OpenVINO row says which precision OpenVINO chose); an OpenVINO bundle from
    ``fedyolo export format=openvino`` runs in OpenVINO. The same weights score alike."""
    from fl_server.cli import main

    out, meta = fp32_bundle
    exported = ["export", str(run_dir / "best.pt"), "format=openvino", f"out={tmp_path / 'ov'}"]
    assert main(exported) == 0
    ov_meta = json.loads((tmp_path / "ov" / "model.json").read_text())
    assert ov_meta["status"] == "accepted", ov_meta
    # the OpenVINO bundle computes the checkpoint's function: in fp32 (as OpenVINO's CPU plugin
    # runs it where no bf16 path is chosen) its raw outputs match PyTorch's within the fp32
    # parity threshold, while two held-out images move them far more
    import openvino as ov

    imgsz, limit = meta["imgsz"][0], settings.load("export", []).gates.parity_max_abs
    (xml,) = (tmp_path / "ov" / ov_meta["file"]).glob("*.xml")
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    torch_out = raw_outputs(run_dir, run_dir / "best.pt", imgsz)
    assert between_images(torch_out) > 10 * limit
    images = inputs.image_files(run_dir / "data" / "server_val")[: len(torch_out)]
    for image, ref in zip(images, torch_out, strict=True):
        got = compiled(inputs.load(image, imgsz))[0].astype(np.float64)
        assert np.abs(got - ref).max() <= limit, np.abs(got - ref).max()
    args = [f"out={tmp_path / 'b'}", "runs=3", "warmup=1", "threads=[1]"]
    runtimes = "runtimes=[onnxruntime,openvino]"
    assert main(["bench", str(out), str(tmp_path / "ov"), *args, runtimes]) == 0
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["results"]
    assert [(r["model"], r["runtime"]) for r in rows] == [
        ("onnx-fp32", "onnxruntime"),
        ("onnx-fp32 · openvino", "openvino"),
        (ov_meta["variant"], "openvino"),
    ], rows
    for r in rows:
        assert r["p50_ms"] > 0 and r["size_mb"] > 0 and r["map50_95"] is not None, r
        assert r["imgsz"] == meta["imgsz"][0]
        assert ("precision" in r) == (r["runtime"] == "openvino"), r
    ref = rows[0]["map50_95"]
    assert all(abs(r["map50_95"] - ref) <= 0.02 + 0.1 * ref for r in rows), rows


@pytest.mark.parametrize(
    "override, message",
    [
        ("quantize=7", "quantize: 7 is not 32, 16 or 8"),
        ("imgsz=100", "imgsz: 100 is not a multiple of the stride 32"),
        ("int8.activations=u16", "int8.activations"),
        ("qantize=8", "unknown setting 'qantize'"),
        ("int8.calibration=/no/such/folder", "int8.calibration"),
    ],
)
def test_bad_export_settings_are_one_line(override, message):
    with pytest.raises(EdgeError, match=message.replace("|", r"\|")):
        settings.load("export", [override])


def test_calibration_on_the_held_out_set_is_refused(run_dir, tmp_path):
    held_out = run_dir / "data" / "server_val" / "images"
    cfg = settings.load("export", [f"out={tmp_path}", "quantize=8", f"int8.calibration={held_out}"])
    with pytest.raises(EdgeError, match="held-out set"):
        ex.export(run_dir / "best.pt", cfg)


def test_formats_this_machine_cannot_export_say_why(run_dir, tmp_path, capsys):
    import importlib.util

    import torch

    from fl_server.cli import main

    checkpoint = str(run_dir / "best.pt")
    if not torch.cuda.is_available():
        assert main(["export", checkpoint, "format=engine", f"out={tmp_path}"]) == 2
        assert capsys.readouterr().err.strip() == (
            "fedyolo: error: format=engine (TensorRT) needs an NVIDIA GPU; this machine has no "
            "CUDA device"
        )
    if importlib.util.find_spec("openvino") is None:
        assert main(["export", checkpoint, "format=openvino", f"out={tmp_path}"]) == 2
        assert "needs the openvino package" in capsys.readouterr().err
    assert main(["export", checkpoint, "format=openvino", "quantize=8"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("runtimes=[tensorrt]", "runtimes: ['tensorrt'] not onnxruntime or openvino"),
        ("runtimes=[]", "runtimes: [] not onnxruntime or openvino"),
        ("threads=0", "threads: expected integers >= 1"),
    ],
)
def test_bad_bench_settings_are_one_line(override, message):
    with pytest.raises(EdgeError, match=re.escape(message)):
        settings.load("bench", [override])


def test_a_model_a_runtime_cannot_run_is_named_and_the_others_are_measured(
    fp32_bundle, tmp_path, monkeypatch, capsys
):
    """OpenVINO refusing a file (as its CPU plugin refuses a signed-activation INT8 file on some
    CPUs; injected here, since it depends on the CPU) loses only that row: the ONNX Runtime row
    is measured and written, the failure is a row of its own and in bench.json, and the command
    exits 1 naming it."""
    from deploy.edge import bench
    from fl_server.cli import main

    real = bench.measure_in_child

    def refusing(path, imgsz, threads, runs, warmup, runtime=None):
        if runtime == "openvino":
            raise EdgeError(f"bench {path} at {imgsz}: the measuring process failed: no kernel")
        return real(path, imgsz, threads, runs, warmup, runtime)

    monkeypatch.setattr(bench, "measure_in_child", refusing)
    out, _ = fp32_bundle
    args = [
        f"out={tmp_path}",
        "runs=2",
        "warmup=0",
        "threads=[1]",
        "runtimes=[onnxruntime,openvino]",
    ]
    assert main(["bench", str(out), *args]) == 1
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["model"], r["runtime"]) for r in report["results"]] == [("onnx-fp32", "onnxruntime")]
    assert report["results"][0]["map50_95"] is not None
    (failed,) = report["failed"]
    assert failed["model"] == "onnx-fp32 · openvino" and "no kernel" in failed["error"]
    md = (tmp_path / "bench.md").read_text()
    assert "| onnx-fp32 · openvino |" in md and "failed: " in md
    assert all(line.count("|") == 11 for line in md.splitlines()), md  # ten columns each
    assert "no kernel" in capsys.readouterr().err


def test_a_measuring_child_reports_its_own_peak_memory_not_its_parents():
    """Linux's ru_maxrss in a child keeps the parent's size at the fork; the bench's peak RSS
    must be the child's own (it read the parent's for every model measured after it grew)."""
    import subprocess

    import psutil

    ballast = np.ones(1536 * 2**20 // 8)  # 1.5 GiB held (and touched) by this process
    parent_kib = psutil.Process().memory_info().rss // 1024
    child = subprocess.run(
        [sys.executable, "-c", "from fl_client.memory import peak_rss_mib; print(peak_rss_mib())"],
        capture_output=True,
        text=True,
        check=True,
    )
    child_kib = float(child.stdout.strip().splitlines()[-1]) * 1024
    assert 0 < child_kib < parent_kib - 2**20, (child_kib, parent_kib)  # 1 GiB below it
    del ballast


def _dfl_graph(path: Path, perm=(0, 2, 1, 3), bias: bool = False) -> Path:
    """Ultralytics' DFL decode alone, as its exporter writes it: [1, 4·16, A] → Reshape
    [1, 4, 16, A] → Transpose(perm) → Softmax(axis=1) → Conv(1×1, weights 0..15) → [1, 4, A]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    a = 7
    inits = [
        numpy_helper.from_array(np.array([1, 4, 16, a], np.int64), "shape4"),
        numpy_helper.from_array(np.array([1, 4, a], np.int64), "shape3"),
        numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "w"),
        numpy_helper.from_array(np.zeros(1, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "shape4"], ["r"], name="/model.22/dfl/Reshape"),
        helper.make_node("Transpose", ["r"], ["t"], name="/model.22/dfl/Transpose", perm=perm),
        helper.make_node("Softmax", ["t"], ["s"], name="/model.22/dfl/Softmax", axis=1),
        helper.make_node(
            "Conv", ["s", "w", *(["b"] if bias else [])], ["c"], name="/model.22/dfl/conv/Conv"
        ),
        helper.make_node("Reshape", ["c", "shape3"], ["y"], name="/model.22/dfl/Reshape_1"),
    ]
    graph = helper.make_graph(
        nodes,
        "dfl",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, a])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, a])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_dfl_last_axis_keeps_the_decodes_numbers_and_leaves_other_graphs_alone(tmp_path):
    import onnx
    import onnxruntime as ort

    x = np.random.default_rng(0).normal(size=(1, 64, 7)).astype(np.float32) * 4

    def run(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    src = _dfl_graph(tmp_path / "dfl.onnx")
    before = run(src)
    assert q.dfl_last_axis(src)
    ops = [n.op_type for n in onnx.load(str(src)).graph.node]
    assert "Conv" not in ops and "MatMul" in ops
    assert np.abs(run(src) - before).max() <= 1e-5 * np.abs(before).max()
    assert q.decode_convs(onnx.load(str(src))) == ["/model.22/dfl/conv/Conv"]  # found as decode

    for name, kw in (("perm", {"perm": (0, 1, 2, 3)}), ("bias", {"bias": True})):
        other = _dfl_graph(tmp_path / f"{name}.onnx", **kw)
        data = other.read_bytes()
        assert not q.dfl_last_axis(other), name  # not the pattern: the file is left as it was
        assert other.read_bytes() == data, name
