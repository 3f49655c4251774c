"""The Flower and ClearML internals fedyolo relies on (fl_server/*_adapter.py) still hold."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict


def test_wire_bytes_sums_to_flowers_own_serialized_size():
    from flwr.common.serde import message_to_proto

    from fl_server.flower_adapter import varint_size, wire_bytes

    for n in (0, 1, 127, 128, 16383, 16384, 2**21, 2**35):
        from google.protobuf.internal import encoder

        assert varint_size(n) == len(encoder._VarintBytes(n)), n  # protobuf's own, for the test
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(5000, dtype=np.float32))}),
            "config": ConfigRecord({"server-round": 3}),
        }
    )
    msg = Message(content=content, dst_node_id=7, message_type="train")
    sizes: dict[int, int] = {}
    assert wire_bytes(msg, sizes) == message_to_proto(msg).ByteSize(), (
        "flwr.common.serde's Message layout changed: fl_server/flower_adapter.py's wire_bytes "
        "no longer adds up to the serialized message"
    )


def test_clearml_reporting_thread_switch_exists():
    from clearml import Task

    from fl_server.clearml_adapter import use_reporting_thread

    saved = Task._report_subprocess_enabled
    try:
        use_reporting_thread(Task)
        assert Task._report_subprocess_enabled is False
    finally:
        Task._report_subprocess_enabled = saved


def test_clearml_starts_nothing_in_a_forked_child(tmp_path, monkeypatch):
    """ClearML's at-fork hook started its reporting threads in every forked child before exec;
    Ray forks with a preexec_fn, and one such child deadlocked on an import lock. After
    ``open_task`` a forked child has only the thread that forked it."""
    import subprocess
    import sys
    import threading

    from fl_server.run_dir import RunDir
    from fl_server.tracking import open_task

    run = RunDir(tmp_path / "run")
    run.clearml.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(run.clearml))
    task = open_task(run, "offline", "fedyolo-tests", "fork")
    out = tmp_path / "threads"
    try:

        def count_threads() -> None:  # runs in the forked child, before exec (as Ray's does)
            out.write_text(str(threading.active_count()))

        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=count_threads, check=True)
    finally:
        task.close()
    assert out.read_text() == "1"


def test_a_recorddict_survives_flowers_protobuf_round_trip():
    """The warm worker's frames (fl_client/flower_adapter.py): Flower's serde turns a
    RecordDict into bytes and back, arrays and configs intact."""
    from fl_client.flower_adapter import recorddict_from_bytes, recorddict_to_bytes

    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(12, dtype=np.float32).reshape(3, 4))}),
            "config": ConfigRecord({"server-round": 3, "names": ["a", "b"]}),
        }
    )
    back = recorddict_from_bytes(recorddict_to_bytes(content))
    assert np.array_equal(back["arrays"]["w"].numpy(), content["arrays"]["w"].numpy()), (
        "flwr.common.serde's recorddict_to_proto/recorddict_from_proto no longer round-trip "
        "arrays: fl_client/flower_adapter.py's worker frames are broken"
    )
    assert dict(back["config"]) == dict(content["config"])


def test_the_server_adapter_re_exports_the_clients():
    import fl_client.flower_adapter as client_side
    import fl_server.flower_adapter as server_side

    assert server_side.wire_bytes is client_side.wire_bytes


def test_ultralytics_ap_per_class_returns_the_ap_array_fifth():
    """fl_client/ultralytics_adapter.py's ap_per_threshold: element 5 of ap_per_class's tuple is
    the (classes with targets, IoU thresholds) AP array."""
    from fl_client.ultralytics_adapter import ap_per_threshold

    n = 20
    tp = np.ones((n, 10), dtype=bool)  # every prediction right at every IoU threshold
    conf = np.linspace(0.9, 0.5, n)
    cls = np.array([0, 1] * (n // 2), dtype=float)
    ap = ap_per_threshold(tp, conf, cls, cls)
    assert ap.shape == (2, 10), (
        "ultralytics.utils.metrics.ap_per_class()[5] is no longer the per-class, per-threshold "
        f"AP array (shape {getattr(ap, 'shape', None)})"
    )
    assert (ap > 0.99).all()


def test_ultralytics_detection_validator_keeps_per_batch_stats_until_get_stats():
    """fl_client/ultralytics_adapter.py's keeping_validator reads metrics.stats (per-batch lists
    under tp, conf, pred_cls, target_cls) in get_stats, before Ultralytics clears them."""
    import inspect

    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils.metrics import DetMetrics

    from fl_client.ultralytics_adapter import keeping_validator

    stats = DetMetrics().stats
    assert {"tp", "conf", "pred_cls", "target_cls"} <= set(stats), (
        f"Ultralytics' DetMetrics.stats keys changed ({sorted(stats)}): keeping_validator breaks"
    )
    assert all(isinstance(v, list) for v in stats.values())
    assert "clear_stats" in inspect.getsource(DetectionValidator.get_stats), (
        "DetectionValidator.get_stats no longer clears metrics.stats: keeping_validator's "
        "reason to copy them first changed"
    )
    assert issubclass(keeping_validator(), DetectionValidator)


def test_ultralytics_letterbox_pads_to_a_fixed_square():
    """fl_client/ultralytics_adapter.py's letterbox: LetterBox(auto=False)(image=...) gives the
    square input an exported model takes, padded grey (114)."""
    from fl_client.ultralytics_adapter import letterbox

    image = np.zeros((50, 100, 3), dtype=np.uint8)
    out = letterbox(image, 64)
    assert out.shape == (64, 64, 3), f"LetterBox gave {out.shape}, not the (64, 64, 3) square"
    assert out[0, 0, 0] == 114 and out[32, 32, 0] == 0


def test_ultralytics_model_yaml_reads_a_shipped_name_and_refuses_an_unknown_one():
    """fl_client/ultralytics_adapter.py's model_yaml: yaml_model_load takes a shipped model's
    name (scale from the name) and raises FileNotFoundError for one it does not know."""
    import pytest

    from fl_client.ultralytics_adapter import model_yaml

    d = model_yaml("yolov8n.yaml")
    assert d["scale"] == "n" and "backbone" in d, "yaml_model_load's model dict changed"
    with pytest.raises((FileNotFoundError, OSError)):
        model_yaml("no-such-model-here.yaml")


def test_ultralytics_detection_model_builds_a_head_for_the_classes_asked():
    """fl_client/ultralytics_adapter.py's detection_model: DetectionModel(cfg, nc=, verbose=)
    builds from a shipped name or an architecture dict, its head sized for nc classes."""
    from fl_client.ultralytics_adapter import detection_model, model_yaml

    for cfg in ("yolov8n.yaml", model_yaml("yolov8n.yaml")):
        model = detection_model(cfg, 3)
        assert model.model[-1].nc == 3 and model.yaml["nc"] == 3, (
            "ultralytics.nn.tasks.DetectionModel(cfg, nc=3) no longer gives a 3-class head"
        )
    assert detection_model(model.yaml, None).model[-1].nc == 3  # the architecture's own


def test_ultralytics_distillation_pairs_feature_levels_of_the_detect_head():
    """fl_client/ultralytics_adapter.py's feature_levels: get_distill_layers names the Detect
    head's input layers, then the head (YOLOv8: three levels)."""
    from fl_client.ultralytics_adapter import detection_model, feature_levels

    assert feature_levels(detection_model("yolov8n.yaml", 2)) == 3, (
        "DistillationModel.get_distill_layers no longer lists the Detect head's inputs and the "
        "head: fl_client/distill.py's teacher/student level check is wrong"
    )


def test_ultralytics_trainer_reports_its_losses_and_images(tiny_data, tmp_path, monkeypatch):
    """fl_client/ultralytics_adapter.py's trainer_losses and trainer_examples, on a real trainer
    after one tiny epoch: BaseTrainer.tloss holds the epoch's mean losses (a dict by name, or a
    tensor named by loss_names) and train_loader.dataset the shard's training images."""
    import math

    import yaml

    from fl_client import train
    from fl_client.model import build_model
    from fl_client.ultralytics_adapter import trainer_examples, trainer_losses

    trainers = []
    monkeypatch.setattr(train, "trainer_examples", lambda t: trainers.append(t) or 0)
    names = yaml.safe_load(tiny_data.read_text())["names"]
    names = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
    train.train_round(
        build_model("fedyolo-tiny.yaml", names),
        tiny_data,
        tmp_path,
        **dict(epochs=1, imgsz=64, batch=16, lr0=0.01, optimizer="SGD", momentum=0.9),
        **dict(weight_decay=0.0, mosaic=0.0, device="cpu", amp=False, workers=0, seed=0),
    )
    (trainer,) = trainers
    tloss = trainer.tloss
    assert isinstance(tloss, dict) or len(tloss) == len(trainer.loss_names), (
        f"BaseTrainer.tloss ({type(tloss).__name__}) is neither a dict of losses nor named by "
        "loss_names: trainer_losses misreads it"
    )
    losses = trainer_losses(trainer)
    assert {"box_loss", "cls_loss", "dfl_loss"} <= set(losses), (
        f"BaseTrainer's losses are named {sorted(losses)}, not box_loss, cls_loss, dfl_loss"
    )
    assert all(math.isfinite(v) for v in losses.values())
    images = len(list((tiny_data.parent / "images").glob("*.jpg")))
    assert trainer_examples(trainer) == images, (
        "BaseTrainer.train_loader.dataset no longer holds the shard's training images"
    )


def test_ultralytics_trainer_internals_are_read_only_by_the_adapter():
    """fl_client/train.py asks the adapter for a trained trainer's losses and example count."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[2] / "fl_client" / "train.py").read_text())
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not read & {"tloss", "loss_names", "train_loader"}


class _Nodes:
    """The one thing a strategy's configure_train asks of the Grid: the connected nodes."""

    def get_node_ids(self):
        return [1, 2]


def _one_round(strategy, rnd: int, weights: np.ndarray) -> np.ndarray:
    """A real round of ``strategy``: configure_train on ``weights``, two clients' replies."""
    from flwr.app import MetricRecord

    strategy.configure_train(rnd, ArrayRecord({"w": Array(weights)}), ConfigRecord({}), _Nodes())
    replies = []
    for node, (scale, n) in enumerate(((0.5, 30), (2.0, 10)), start=1):
        sent = Message(
            RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train"
        )
        reply = {
            "arrays": ArrayRecord({"w": Array(weights * scale + rnd)}),
            "metrics": MetricRecord({"num-examples": n}),
        }
        replies.append(Message(RecordDict(reply), reply_to=sent))
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return arrays["w"].numpy()


def test_a_flower_strategys_state_is_its_attributes_and_round_trips(tmp_path):
    """fl_server/flower_adapter.py's strategy_state: a server optimizer keeps its moments
    (FedAdam's m_t, v_t) and FedAvgM its momentum in instance attributes; saved after round 1
    (through the state file) and restored into a fresh strategy, round 2 comes out the same."""
    from flwr.serverapp.strategy import FedAdam, FedAvgM

    from fl_server import state
    from fl_server.flower_adapter import strategy_state

    for make, kept in (
        (lambda: FedAdam(eta=0.1), {"m_t", "v_t", "current_arrays"}),
        (lambda: FedAvgM(server_momentum=0.9), {"momentum_vector", "current_arrays"}),
    ):
        w0 = np.linspace(-1, 1, 8).astype(np.float32)
        live = make()
        w1 = _one_round(live, 1, w0)
        attrs = strategy_state(live)
        assert kept <= {k for k, v in attrs.items() if v is not None}, (
            f"{type(live).__name__} no longer keeps {sorted(kept)} as attributes after a round "
            f"(has {sorted(attrs)}): fl_server/state.py would resume it without its state"
        )
        path = tmp_path / f"{type(live).__name__}.npz"
        empty = {"round": 1, "strategy_note": None, "guard": None, "drift": None}
        doc = {**empty, "weights": w1, "strategy": attrs, "best": (w1, None), "tracker_task": None}
        assert state.save(path, doc) == []
        resumed = make()
        state.restore_strategy(resumed, state.load(path)["strategy"])
        expected = _one_round(live, 2, w1)
        np.testing.assert_array_equal(_one_round(resumed, 2, w1), expected)
        assert not np.allclose(_one_round(make(), 2, w1), expected)  # the state mattered


def test_clearml_names_its_api_server_before_connecting(monkeypatch):
    """fl_server/clearml_adapter.py's api_server_host: ClearML's Session resolves the API server
    from CLEARML_API_HOST (the probe before Task.init asks it where to knock)."""
    from fl_server.clearml_adapter import api_server_host

    monkeypatch.setenv("CLEARML_API_HOST", "http://clearml.example:8008/")
    assert api_server_host() == "http://clearml.example:8008", (
        "clearml.backend_api.session.Session.get_api_server_host() no longer reads "
        "CLEARML_API_HOST: fl_server/tracking.py's reachability probe knocks on the wrong door"
    )


# Where each private module may be imported: the adapters, and nowhere else.
PRIVATE_MODULES = (
    "flwr.proto",
    "flwr.common.serde",
    "flwr.supercore",
    "ultralytics.utils.metrics",
    "ultralytics.data.augment",
    "ultralytics.data.utils",
    "ultralytics.models.yolo.detect",
    "ultralytics.nn",
    "ultralytics.utils",
    "ultralytics.engine",
    "clearml.backend_api",
    "clearml.binding",
)
ADAPTERS = {
    "fl_client/flower_adapter.py",
    "fl_client/ultralytics_adapter.py",
    "fl_server/clearml_adapter.py",
}


def test_private_library_modules_are_imported_only_by_the_adapters():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    found = []
    for package in ("fl_client", "fl_server", "strategies", "tuning", "deploy"):
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in ADAPTERS:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for name in names:
                    if any(name == p or name.startswith(p + ".") for p in PRIVATE_MODULES):
                        found.append(f"{rel}:{node.lineno} imports {name}")
    assert not found, "private library modules outside the adapters:\n" + "\n".join(found)
