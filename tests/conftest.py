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
