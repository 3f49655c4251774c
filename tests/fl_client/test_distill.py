"""Federated distillation: the teacher crosses the wire once, teaches, and is never trained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inprocess import run_inprocess, tiny_config  # noqa: E402

from fl_client import distill  # noqa: E402
from fl_server.config import ConfigError  # noqa: E402


def _with_identity():
    from flwr.supercore.task_identity import TaskIdentity

    mp = pytest.MonkeyPatch()
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        mp.setattr(TaskIdentity, attr, value)
    return mp


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A 1-round tiny federation's best.pt: the teacher."""
    mp = _with_identity()
    try:
        run, _ = run_inprocess(tmp_path_factory.mktemp("teacher"), [], clients=2, name="teacher")
    finally:
        mp.undo()
    return run.best


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    mp = _with_identity()
    try:
        run, _ = run_inprocess(
            tmp_path_factory.mktemp("student"),
            [f"distill.teacher={teacher}", "federation.rounds=2"],
            clients=2,
            name="student",
        )
    finally:
        mp.undo()
    return run


def test_teacher_is_sent_once_and_distillation_loss_is_reported(distilled, teacher):
    from fl_client.model import WEIGHTS_KEY, build_model, to_record

    rounds = [json.loads(line) for line in distilled.metrics.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert len(r["clients"]) == 2
        for c in r["clients"]:  # per client per round
            assert np.isfinite(c["loss_distill"]) and c["loss_distill"] > 0, c
    first = {c["id"]: c for c in rounds[0]["clients"]}
    second = {c["id"]: c for c in rounds[1]["clients"]}
    assert all(c["teacher_received"] == 1 for c in first.values())
    assert all(c["teacher_received"] == 0 for c in second.values())
    manifest = json.loads(distilled.manifest.read_text())
    names = manifest["data"]["names"]
    t = build_model(str(teacher), names)
    teacher_bytes = to_record(t)[WEIGHTS_KEY].numpy().nbytes
    for cid, c in first.items():  # the teacher went down in round 1 only
        extra = c["bytes_down"] - second[cid]["bytes_down"]
        assert teacher_bytes <= extra <= teacher_bytes + 20_000, (extra, teacher_bytes)
    start = next(
        json.loads(e)
        for e in distilled.events.read_text().splitlines()
        if json.loads(e)["kind"] == "run_start"
    )
    sha, _ = distill.teacher_records(t)
    assert start["distill_teacher_sha256"] == sha
    assert manifest["distill_teacher"]["file"] == "teacher.pt"


def test_no_distillation_hook_outlives_its_round(distilled):
    """The client's cached student and teacher carry no feature hook after a distilled round:
    a later round without distillation deep-copies the model (Ultralytics' EMA) and would fail
    on the hooks' non-leaf tensors."""
    import copy

    from ultralytics.nn.distill_model import FeatureHook

    from fl_client import client_app

    models = [*client_app._MODEL_CACHE.values(), *distill._MEMORY.values()]
    assert models
    for model in models:
        hooks = [h for m in model.modules() for h in m._forward_hooks.values()]
        assert not any(isinstance(h, FeatureHook) for h in hooks)
        copy.deepcopy(model)


def test_teacher_is_never_trained_nor_aggregated(distilled, teacher):
    import torch
    from ultralytics.nn.tasks import torch_safe_load

    from fl_client.model import build_model

    names = json.loads(distilled.manifest.read_text())["data"]["names"]
    # the run's copy of the teacher is byte-identical to the user's file
    assert (distilled.path / "teacher.pt").read_bytes() == teacher.read_bytes()
    ckpt, _ = torch_safe_load(str(distilled.best), safe_only=True)
    student = ckpt["model"]
    assert not hasattr(student, "teacher_model") and not hasattr(student, "projector")
    fresh = build_model("fedyolo-tiny.yaml", names)  # the student's architecture
    assert [tuple(v.shape) for v in student.state_dict().values()] == [
        tuple(v.shape) for v in fresh.state_dict().values()
    ]
    assert isinstance(student, torch.nn.Module)


def test_teacher_for_refuses_what_it_was_not_named(teacher, tmp_path, monkeypatch):
    from flwr.app import RecordDict

    from fl_client.model import build_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    names = ["car", "pedestrian", "cyclist", "traffic_sign"]
    t = build_model(str(teacher), names)
    sha, records = distill.teacher_records(t)
    content = RecordDict(dict(records))
    with pytest.raises(ValueError, match="received sha256"):
        distill.teacher_for("0" * 64, content, names)
    distill._MEMORY.clear()
    with pytest.raises(FileNotFoundError, match="not cached on this client"):
        distill.teacher_for(sha, RecordDict(), names)
    assert distill.teacher_for(sha, content, names) is not None  # cached in memory and on disk
    distill._MEMORY.clear()
    assert distill.teacher_for(sha, RecordDict(), names) is not None  # from disk
    cached = distill.cache_dir() / f"{sha}.npz"
    with np.load(cached) as f:  # a tampered cache is never used
        np.savez(cached, arch=f["arch"], weights=f["weights"] * 2)
    distill._MEMORY.clear()
    with pytest.raises(FileNotFoundError):
        distill.teacher_for(sha, RecordDict(), names)


def test_a_teacher_that_cannot_teach_is_one_line(teacher, tmp_path):
    from fl_client.model import ModelConfigError, build_model, save_checkpoint

    names = ["car", "pedestrian", "cyclist", "traffic_sign"]
    student = build_model("fedyolo-tiny.yaml", names)
    with pytest.raises(ModelConfigError, match=r"detects \['car', 'pedestrian'"):
        distill.load_teacher(teacher, ["car", "truck", "bus", "sign"], student)
    p2 = save_checkpoint(build_model("yolov8n-p2.yaml", names), tmp_path / "p2.pt", {}, {})
    with pytest.raises(ModelConfigError, match="4 feature levels, the student's 3"):
        distill.load_teacher(p2, names, student)
    with pytest.raises(ConfigError, match=r"distill.teacher='/no/such.pt' does not exist"):
        tiny_config(tmp_path, ["distill.teacher=/no/such.pt"])


def test_distill_starts_from_the_teacher_runs_config(teacher, capsys):
    from fl_server.cli import main
    from fl_server.config import from_run, load

    run = teacher.parent
    theirs = load(run / "config.yaml")
    cfg = from_run(
        run, ["model.cfg=yolov8n.yaml", f"distill.teacher={teacher}", "engine=local-deployment"]
    )
    assert cfg.model.cfg == "yolov8n.yaml" and cfg.distill.teacher == str(teacher)
    assert cfg.engine.name == "local-deployment"
    for key in ("data", "seed", "train", "federation"):  # same data, partition and training
        assert cfg[key] == theirs[key], key
    with pytest.raises(ConfigError, match="'federation.rouns' is not a setting"):
        from_run(run, ["federation.rouns=3"])
    assert main(["distill", str(run), "federation.rounds=1"]) == 2
    assert "give the student once" in capsys.readouterr().err
