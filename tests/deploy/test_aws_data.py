"""``fedyolo deploy aws data upload``: a partition into the state bucket, one prefix per slot,
and what an instance syncs from there is a client's ``data-path`` shard and a held-out-only
server (``data.partition=none``). S3 is moto's HTTP server (real botocore, ``AWS_ENDPOINT_URL``);
an instance's ``aws s3 sync`` is played by downloading every object of its prefix."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("moto")
pytest.importorskip("boto3")

from deploy.aws import AwsError, stack  # noqa: E402
from deploy.aws import data as aws_data  # noqa: E402
from fl_server.cli import main  # noqa: E402

REGION = "eu-west-1"  # the `aws` fixture's (tests/conftest.py)


def settings(name: str, *more: str):
    return stack.load_settings([f"name={name}", f"region={REGION}", "ami=ami-12345678", *more])


def make_bucket(cfg, aws) -> str:
    bucket = stack.Context(cfg, aws).bucket
    aws.client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    return bucket


def synced(aws, bucket: str, prefix: str, dest: Path) -> Path:
    """``aws s3 sync s3://<bucket>/<prefix> <dest>``: every object of the prefix, as a file."""
    s3 = aws.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out = dest / o["Key"].removeprefix(prefix)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
    return dest


@pytest.fixture
def partition(tiny_data, tmp_path) -> Path:
    out = tmp_path / "part"
    assert main(["data", "partition", str(tiny_data), str(out), "--clients", "2"]) == 0
    return out


def test_upload_puts_each_slot_under_its_prefix_checked_and_only_once(aws, partition, tmp_path):
    cfg = settings("dataup", "clients.max=2", "clients.desired=2")
    bucket = make_bucket(cfg, aws)
    rows = aws_data.upload(cfg, partition, aws)
    assert [r["prefix"] for r in rows] == ["data/server/", "data/slot-0/", "data/slot-1/"]
    assert all(r["uploaded"] == r["files"] > 0 for r in rows)

    slot = synced(aws, bucket, "data/slot-1/", tmp_path / "slot1")
    # the links of the partition are uploaded as content, data.yaml has no absolute path
    assert "path" not in yaml.safe_load((slot / "data.yaml").read_text())
    assert not any(p.is_symlink() for p in slot.rglob("*"))
    # what the instance runs after its sync: sha256sum -c SHA256SUMS
    check = subprocess.run(
        ["sha256sum", "-c", "--quiet", "--strict", "SHA256SUMS"], cwd=slot, capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    listed = (slot / "SHA256SUMS").read_text().splitlines()
    assert len(listed) == rows[2]["files"]

    again = aws_data.upload(cfg, partition, aws)  # nothing changed: nothing sent
    assert [r["uploaded"] for r in again] == [0, 0, 0]
    # one image changed in client_0: that file only; a removed file is removed from S3 too
    image = next((partition / "client_0" / "train" / "images").iterdir())
    image.unlink()
    image.write_bytes(b"not the same image")
    gone = next((partition / "client_1" / "train" / "labels").iterdir())
    gone.unlink()
    third = {r["prefix"]: r for r in aws_data.upload(cfg, partition, aws)}
    assert third["data/slot-0/"]["uploaded"] == 1
    assert third["data/slot-1/"]["deleted"] == 1 and third["data/slot-1/"]["uploaded"] == 0
    key = "data/slot-0/" + image.relative_to(partition / "client_0").as_posix()
    body = aws.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(b"not the same image").hexdigest()


def test_more_client_folders_than_slots_is_one_line_and_uploads_nothing(aws, partition, capsys):
    cfg = settings("dataone", "clients.max=1", "clients.desired=1")
    bucket = make_bucket(cfg, aws)
    with pytest.raises(AwsError, match=r"client folders \[0, 1\].*1 slots \(clients.max=1\)"):
        aws_data.upload(cfg, partition, aws)
    assert aws.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    # the command line: exit 2, one line
    code = main(["deploy", "aws", "data", "upload", str(partition), "name=dataone",
                 f"region={REGION}", "clients.max=1", "clients.desired=1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "clients.max=1" in err[0], err


def test_synced_folders_are_a_held_out_only_server_and_data_path_clients(aws, partition, tmp_path):
    """The server instance's folder prepares a run with only its held-out set; each client
    instance's folder trains as its SuperNode's data-path shard (in-process federation)."""
    from inprocess import InProcessGrid, tiny_config

    from fl_server.prepare import prepare_run
    from fl_server.run_dir import RunDir, read_jsonl
    from fl_server.server_app import serve

    cfg = settings("datafed", "clients.max=2", "clients.desired=2")
    bucket = make_bucket(cfg, aws)
    aws_data.upload(cfg, partition, aws)
    server = synced(aws, bucket, "data/server/", tmp_path / "server-instance" / "data")
    slots = [synced(aws, bucket, f"data/slot-{i}/", tmp_path / f"slot-{i}") for i in (0, 1)]

    run = prepare_run(
        tiny_config(tmp_path, [f"data.path={server / 'data.yaml'}", "data.partition=none"], 2)
    )
    manifest = json.loads(run.manifest.read_text())["data"]
    assert manifest["clients_own_data"] is True and manifest["clients"] == []
    held_out = len(list((server / "images").iterdir()))
    assert manifest["server_val_images"] == held_out
    written = sorted(p.name for p in run.data.iterdir() if p.is_dir())
    assert written == [RunDir.SERVER_VAL]  # no client shard

    grid = InProcessGrid(2)
    for n, ctx in grid.contexts.items():  # the client instances' node config
        i = n - 1
        ctx.node_config = {
            "partition-id": i,
            "num-partitions": 2,
            "data-path": str(slots[i] / "data.yaml"),
        }
    serve(grid, run.path)
    assert json.loads(run.summary.read_text())["status"] == "completed"
    (record,) = read_jsonl(run.metrics)
    assert sorted(c["id"] for c in record["clients"]) == [0, 1]


def test_held_out_only_needs_a_data_path(tmp_path):
    from inprocess import tiny_config

    from fl_server.config import ConfigError
    from fl_server.prepare import prepare_run

    with pytest.raises(ConfigError, match="data.partition=none .* needs data.path"):
        prepare_run(tiny_config(tmp_path, ["data.partition=none"], 2))


def test_a_deployment_without_its_bucket_is_one_line(aws, partition):
    cfg = settings("nobucket", "clients.max=2", "clients.desired=2")
    with pytest.raises(AwsError, match=r"bucket nobucket-state-\d+-eu-west-1: NoSuchBucket; run"):
        aws_data.upload(cfg, partition, aws)
