"""Shared fixtures: a tiny synthetic dataset generated once per session (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# Property tests (Hypothesis) draw the same examples on every machine and run (derandomized: the
# seed comes from the test), so a suite green here is green elsewhere; FEDYOLO_TEST_EXPLORE=1
# draws new ones (and keeps failures in .hypothesis/) to hunt for bugs.
hypothesis_settings.register_profile("fixed", derandomize=True, database=None)
hypothesis_settings.register_profile("explore")
hypothesis_settings.load_profile("explore" if os.environ.get("FEDYOLO_TEST_EXPLORE") else "fixed")

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # as fedyolo's entry points set it


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48-image synthetic driving set at 64 px (data.yaml path)."""
    from fl_server.data import generate

    out = tmp_path_factory.mktemp("synth")
    return generate(out, 48, imgsz=64, seed=1, domains=["day", "night"])


@pytest.fixture(autouse=True)
def _user_cache(monkeypatch, tmp_path_factory):
    # fedyolo's user cache (COCO label conversions) goes to the test's temporary tree
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Flower stamps messages with the running task's identity; in-process federations
    # (tests/inprocess.py) and hand-made messages have none, so every test gets one. A Flower
    # internal, used by tests only: monkeypatch raises if an upgrade renames these.
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny 64 px shards: two day shards, and the first one's scenes at night."""
    from fl_server.data import generate

    root = tmp_path_factory.mktemp("stats")
    return {
        "day": generate(root / "day", 48, imgsz=64, seed=1, domains=["day"]),
        "day2": generate(root / "day2", 48, imgsz=64, seed=2, domains=["day"]),
        "night": generate(root / "night", 48, imgsz=64, seed=1, domains=["night"]),
    }


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's real HTTP AWS endpoint on 127.0.0.1 (never its default 0.0.0.0:5000): boto3
    talks to it with real botocore serialization (``AWS_ENDPOINT_URL``)."""
    import logging

    pytest.importorskip("moto")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"  # AmazonSSMManagedInstanceCore
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(moto_endpoint, monkeypatch):
    """A boto3 session in eu-west-1 whose every client talks to ``moto_endpoint``."""
    boto3 = pytest.importorskip("boto3")
    region = "eu-west-1"
    for k, v in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return boto3.Session(region_name=region)


# `make test`'s tiers (tests/tiers.py): in a tier's session, only that tier's tests are selected
from tiers import pytest_collection_modifyitems  # noqa: E402, F401

# A tiny detector that already detects something, for the drift-guard tests and the edge
# pipeline's (a barely trained tiny model gives the same output for any input, so a check that
# compares two runtimes' outputs would compare constants).
#
# A guard test needs a global model whose held-out mAP is clearly above zero before the poison
# arrives; the tiny model trained from scratch for a few federated rounds is still at 0. So the
# federation starts from a checkpoint trained centrally (Ultralytics, 30 epochs, ~50 s on 2 cores)
# on synthetic images of another seed than the federation's images (no overlap with its held-out
# set).
#
# How good that checkpoint is depends on the machine's floating-point path (another CPU's kernels
# train another model from the same seed), so no guard test may assume a magnitude measured here.
# The fixture measures the checkpoint's mAP50-95 on the fleet's images (none of which it trained
# on) and sets the guard's absolute floor from it: half the starting mAP. Honest rounds of this
# fleet moved the held-out mAP by up to ~22 % of the start; random weights collapse it to ~0, a
# drop of ~100 %. The floor sits between the two on any machine. ``FEDYOLO_TEST_PRETRAIN_SEED``
# trains the checkpoint from another seed: a cheap stand-in for another machine's numerics, to
# check that the guard tests' assertions hold for a model other than the one they were written
# against (the default, 0, is what CI runs).
FLOOR_OF_START = 0.5  # guard.min_abs_drop, as a fraction of the starting mAP50-95


@pytest.fixture(scope="session")
def pretrained_fleet(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides that start a federation from a pre-trained tiny model on a highway fleet, with
    the guard's absolute floor derived from that model's starting mAP50-95."""
    from ultralytics import YOLO

    from fl_client.evaluate import evaluate_checkpoint
    from fl_client.model import resolve_model_cfg
    from fl_server.data import generate

    seed = int(os.environ.get("FEDYOLO_TEST_PRETRAIN_SEED", "0"))
    root = tmp_path_factory.mktemp("pretrained")
    pre = generate(root / "pretrain", 96, imgsz=128, seed=1, domains=["day"], class_mix="highway")
    fleet = generate(root / "fleet", 150, imgsz=128, seed=2, domains=["day"], class_mix="highway")
    model = YOLO(resolve_model_cfg("fedyolo-tiny.yaml"))
    model.train(
        data=str(pre),
        epochs=30,
        imgsz=128,
        batch=16,
        device="cpu",
        workers=0,
        val=False,
        plots=False,
        mosaic=0.0,
        optimizer="SGD",
        lr0=0.02,
        amp=False,
        seed=seed,
        deterministic=True,
        project=str(root / "train"),
        name="tiny",
        exist_ok=True,
        verbose=False,
    )
    ckpt = Path(model.trainer.last)
    assert ckpt.is_file()
    start = evaluate_checkpoint(
        ckpt, fleet, imgsz=128, batch=32, device="cpu", workdir=root / "start"
    )["map50_95"]
    # Not a magnitude test: a guard test needs a model that detects something to protect.
    assert start > 0, f"the pre-trained model detects nothing on the fleet ({start})"
    return [
        f"model.cfg={ckpt}",
        f"data.path={fleet}",
        "train.imgsz=128",
        "data.server_val_fraction=0.3",
        f"guard.min_abs_drop={FLOOR_OF_START * start:.6g}",
    ]
