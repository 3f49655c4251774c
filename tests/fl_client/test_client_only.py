"""A client (robot, edge box, client container) installs only the core dependencies
(``pip install fedyolo[client]``): its ClientApp must train without Ray, Optuna, ClearML,
boto3, docker or ONNX. A real train message, made by the server side in this process, is
handed to fedyolo's ClientApp in a separate process that records what got imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.common.serde import message_to_proto
from inprocess import tiny_config

from fl_client.model import build_model, to_record
from fl_server.prepare import prepare_run
from fl_server.server_app import round_config

HERE = Path(__file__).resolve().parent


def test_client_app_trains_without_any_server_role_package(tmp_path):
    cfg = tiny_config(tmp_path, ["federation.rounds=1"], clients=2)
    run = prepare_run(cfg)
    names = json.loads(run.manifest.read_text())["data"]["names"]
    model = build_model(str(cfg.model.cfg), names)
    config = round_config(cfg, names, run.data, model.yaml).with_round(server_round=1).to_record()
    content = RecordDict({"arrays": to_record(model), "config": config})
    msg = Message(content=content, dst_node_id=1, message_type="train")
    path = tmp_path / "train.msg"
    path.write_bytes(message_to_proto(msg).SerializeToString())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, str(HERE / "client_only_round.py"), str(path), "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "YOLO_OFFLINE": "1", "TMPDIR": str(scratch)},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(scratch.glob("fedyolo-client-*"))  # the round's scratch folder is gone
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] is None
    assert out["metrics"]["num-examples"] > 0 and out["metrics"]["partition-id"] == 1
    assert out["server_only_imported"] == []
