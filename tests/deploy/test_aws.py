"""``fedyolo deploy aws`` against a real AWS API endpoint: moto's HTTP server on 127.0.0.1.

boto3 talks HTTP to it with real botocore serialization (``AWS_ENDPOINT_URL``); no decorator
mocks. The verbs deploy the CloudFormation template with change sets, which moto 5.2.5 runs on
this template. What moto does not do: boot instances (its groups show placeholder instances, no
user data runs), evaluate alarms, roll back a failed change set (it refuses the execute call
with the failing resource's error and leaves the stack as it was: CloudFormation's own rollback
is tested on its documented event records instead), detect drift (``status`` says so), start
an instance refresh, or delete a stack that created its VPC (DependencyViolation on its
placeholder instances' interfaces): every test that runs ``down`` deploys into a VPC of its own
(``vpc.id``), as a reused VPC.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

from deploy.aws import AwsError, s3state, secrets, stack  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REGION = "eu-west-1"  # the `aws` fixture's (tests/conftest.py)
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse", "ignore:No Moto CloudFormation")


def settings(name: str, *more: str):
    return stack.load_settings([f"name={name}", f"region={REGION}", "ami=ami-12345678", *more])


def own_vpc(aws, cidr: str = "10.9.0.0/16") -> list[str]:
    """A VPC and subnet made outside the stack: the settings that reuse them."""
    ec2 = aws.client("ec2")
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    block = cidr.replace("0.0/16", "1.0/24")
    sub = ec2.create_subnet(VpcId=vpc, CidrBlock=block, AvailabilityZone=f"{REGION}a")
    return [f"vpc.id={vpc}", f"vpc.subnets=[{sub['Subnet']['SubnetId']}]"]


def groups(aws, name: str) -> dict[str, tuple[int, int, int]]:
    got = aws.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[f"{name}-server", f"{name}-clients"]
    )["AutoScalingGroups"]
    return {
        g["AutoScalingGroupName"]: (g["MinSize"], g["DesiredCapacity"], g["MaxSize"]) for g in got
    }


def put_images(aws, name: str) -> None:
    """Both roles' images in the deployment's ECR repositories at this fedyolo's version."""
    from importlib.metadata import version

    media = "application/vnd.docker.distribution.manifest.v2+json"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": media, "layers": []})
    for role in ("server", "client"):
        aws.client("ecr").put_image(
            repositoryName=f"{name}/{role}", imageManifest=manifest, imageTag=version("fedyolo")
        )


def test_plan_lists_adds_with_every_billed_item_and_changes_nothing(aws, capsys):
    from fl_server.cli import main

    cfg = settings("plan1")
    got = stack.plan(cfg)
    assert not got["exists"] and got["changes"]
    assert {c["action"] for c in got["changes"]} == {"Add"}
    added = {c["logical"] for c in got["changes"]}
    assert {"ServerGroup", "ClientGroup", "StateBucket", "ServerInterface"} <= added
    assert stack.describe(stack.Context(cfg, aws)) is None  # no stack, not even for review
    assert (
        aws.client("autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=["plan1-clients"]
        )["AutoScalingGroups"]
        == []
    )
    items = {r["item"].split(" (")[0]: r for r in got["costs"]}
    for billed in (
        "public IPv4 addresses",
        "CloudWatch custom metrics",
        "CloudWatch alarms",
        "CloudWatch Logs ingestion",
        "EBS gp3 root volumes",
        "S3 state bucket",
    ):
        assert items[billed]["usd_month"] > 0, billed
    assert any(r["item"].startswith("ECR storage") and r["usd_month"] > 0 for r in got["costs"])
    assert items["NAT gateway: none"]["usd_month"] == 0
    assert items["public IPv4 addresses"]["quantity"] == 1 + 2  # configured: server + 2 clients
    assert not any(r["verified"] for r in got["costs"])
    assert got["counts"] == "configured"
    assert main(["deploy", "aws", "plan", "name=plan1", f"region={REGION}", "ami=ami-1"]) == 0
    out = capsys.readouterr().out
    assert "Add     ServerGroup" in out and "unverified" in out


def test_up_creates_keys_once_then_a_changed_setting_is_a_modify(aws):
    cfg = settings("up1", "server.private_ip=10.42.0.10")
    done = stack.up(cfg)
    assert done["status"] == "CREATE_COMPLETE" and not done["images_ready"]
    assert {c["action"] for c in done["changes"]} == {"Add"}
    # no image yet: no instance may boot (the boot script would pull nothing)
    assert groups(aws, "up1") == {"up1-server": (0, 0, 1), "up1-clients": (0, 0, 4)}

    ssm = aws.client("ssm")
    params = {
        p["Name"]: p
        for page in ssm.get_paginator("get_parameters_by_path").paginate(
            Path="/fedyolo/up1/", Recursive=True, WithDecryption=True
        )
        for p in page["Parameters"]
    }
    assert set(params) == set(secrets.names("up1", 4))
    assert set(params) == set(stack.parameter_names(stack.Context(cfg, aws)))
    for n, p in params.items():
        public = n.endswith((".crt", "/pub"))
        assert p["Type"] == ("String" if public else "SecureString"), n
    ip = stack.server_ip(stack.Context(cfg, aws))
    assert ip == "10.42.0.10"  # server.private_ip: the interface's address
    cert = params["/fedyolo/up1/server/tls/superlink.crt"]["Value"]
    assert set(secrets.certificate_hosts(cert)) == {ip, "superlink", "localhost", "127.0.0.1"}
    assert "PRIVATE KEY" in params["/fedyolo/up1/client/slots/3/key"]["Value"]

    # nothing changed: no change, no key rotated
    again = stack.up(cfg)
    assert again["changes"] == [] and again["parameters"] == {"created": 0, "kept": len(params)}
    # more key slots: a Modify of the clients' group, new keys for the new slots only
    more = settings("up1", "server.private_ip=10.42.0.10", "clients.max=6")
    planned = stack.plan(more)
    assert planned["exists"] and planned["counts"] == "live"
    modified = {c["logical"]: c for c in planned["changes"]}
    assert modified["ClientGroup"]["action"] == "Modify"
    assert {c["action"] for c in planned["changes"]} == {"Modify"}
    assert groups(aws, "up1")["up1-clients"] == (0, 0, 4)  # plan changed nothing
    grown = stack.up(more)
    assert grown["status"] == "UPDATE_COMPLETE"
    assert groups(aws, "up1")["up1-clients"] == (0, 0, 6)
    assert grown["parameters"] == {"created": 4, "kept": len(params)}
    after = ssm.get_parameter(Name="/fedyolo/up1/client/slots/0/key", WithDecryption=True)
    assert after["Parameter"]["Value"] == params["/fedyolo/up1/client/slots/0/key"]["Value"]
    assert ssm.get_parameter(Name="/fedyolo/up1/server/clients/5/pub")["Parameter"]["Value"]


def test_images_before_instances_then_scale_within_the_slots(aws, capsys):
    from fl_server.cli import main

    vpc = own_vpc(aws, "10.11.0.0/16")
    cfg = settings("img1", *vpc)
    stack.up(cfg)
    with pytest.raises(AwsError, match="waits for its images; run `push` first"):
        stack.scale(cfg, 2)
    put_images(aws, "img1")  # what `push` puts there
    ctx = stack.Context(cfg, aws)
    assert stack.images_ready(ctx)
    assert {r["action"] for r in stack.release(ctx)} == {"sized"}  # push's last step
    assert groups(aws, "img1") == {"img1-server": (1, 1, 1), "img1-clients": (1, 2, 4)}
    # the next up deploys the sized template: the same sizes, the stack agrees with the groups
    stack.up(cfg)
    assert groups(aws, "img1") == {"img1-server": (1, 1, 1), "img1-clients": (1, 2, 4)}
    assert stack.plan(cfg)["changes"] == []

    # scale: one client per key slot (clients.max = 4 slots), within the live group
    args = ["name=img1", f"region={REGION}", "ami=ami-1", *vpc]
    assert main(["deploy", "aws", "scale", "3", *args]) == 0
    assert groups(aws, "img1")["img1-clients"][1] == 3
    assert main(["deploy", "aws", "scale", "8", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "8 clients but 4 key slots (clients.max)" in err
    assert groups(aws, "img1")["img1-clients"][1] == 3
    # settings that allow 6 but a live group that still has 4: refused until `up`
    with pytest.raises(AwsError, match="outside the live group's 1..4; change"):
        stack.scale(settings("img1", *vpc, "clients.max=6"), 6)
    # a fedyolo upgrade whose images are not pushed yet: `up` never takes the fleet to 0
    from importlib.metadata import version

    for role in ("server", "client"):
        aws.client("ecr").batch_delete_image(
            repositoryName=f"img1/{role}", imageIds=[{"imageTag": version("fedyolo")}]
        )
    assert not stack.images_ready(ctx)
    stack.up(cfg)
    assert groups(aws, "img1") == {"img1-server": (1, 1, 1), "img1-clients": (1, 3, 4)}
    assert stack.down(cfg, delete_state=True) == []


def test_a_failed_up_names_the_resource_and_changes_nothing(aws, capsys):
    from fl_server.cli import main

    aws.client("iam").create_role(RoleName="fail1-client", AssumeRolePolicyDocument="{}")
    vpc = own_vpc(aws, "10.12.0.0/16")
    assert main(["deploy", "aws", "up", "name=fail1", f"region={REGION}", "ami=ami-1", *vpc]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fail1-client already exists" in err, err
    assert not aws.client("ssm").get_parameters_by_path(Path="/fedyolo/fail1/", Recursive=True)[
        "Parameters"
    ]  # no key written for a stack that failed


def test_an_instance_type_the_region_lacks_is_one_line_and_nothing_is_made(aws, capsys):
    from fl_server.cli import main

    vpc = own_vpc(aws, "10.13.0.0/16")
    for verb in ("plan", "up"):
        args = ["deploy", "aws", verb, "name=notype", f"region={REGION}", "ami=ami-1", *vpc]
        assert main([*args, "clients.spot_types=[c5.xlarge,zz9.huge]"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert "clients.spot_types=zz9.huge" in err and "not offered in region" in err, err
        assert "c5.xlarge" not in err  # the region has it
    # arm64 clients (Graviton) need arm64 types; x86_64 ones are refused, naming clients.arch
    args = ["deploy", "aws", "plan", "name=notype", f"region={REGION}", "ami=ami-1", *vpc]
    assert main([*args, "clients.arch=arm64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "clients.instance_type=c7i.xlarge is x86_64, not arm64 (clients.arch)" in err, err
    graviton = ["clients.arch=arm64", "clients.instance_type=c7g.xlarge"]
    assert main([*args, *graviton, "clients.spot_types=[c6g.xlarge]"]) == 0
    assert main([*args, *graviton, "server.instance_type=c7g.xlarge"]) == 2
    assert "server.instance_type=c7g.xlarge is arm64, not x86_64" in capsys.readouterr().err
    # one type for both roles is checked for both: x86_64 clients of an arm64 fleet refused
    same = ["clients.arch=arm64", "clients.instance_type=m7i.large", "clients.spot=false"]
    assert main([*args, "server.instance_type=m7i.large", *same]) == 2
    err = capsys.readouterr().err
    assert "clients.instance_type=m7i.large is x86_64, not arm64" in err, err
    # one type for both roles is checked for both: x86_64 clients of an arm64 fleet refused
    same = ["clients.arch=arm64", "clients.instance_type=m7i.large", "clients.spot=false"]
    assert main([*args, "server.instance_type=m7i.large", *same]) == 2
    err = capsys.readouterr().err
    assert "clients.instance_type=m7i.large is x86_64, not arm64" in err, err
    assert stack.describe(stack.Context(settings("notype"), aws)) is None
    assert not aws.client("ssm").get_parameters_by_path(Path="/fedyolo/notype/", Recursive=True)[
        "Parameters"
    ]


def test_a_state_bucket_name_held_by_another_account_is_refused_before_anything(aws):
    """moto answers ``head_bucket`` whatever ``ExpectedBucketOwner`` says, so S3's answer for a
    bucket of another account (403) is stubbed here, on the real client (botocore's Stubber):
    the only stand-in of this file."""
    from botocore.stub import Stubber

    ctx = stack.Context(settings("squat"), aws)
    s3 = aws.client("s3", region_name=REGION)
    stub = Stubber(s3)
    stub.add_client_error("head_bucket", "403", http_status_code=403)
    real = ctx.client
    ctx.client = lambda service, **kw: s3 if service == "s3" else real(service, **kw)
    with stub, pytest.raises(AwsError) as e:
        stack.preflight(ctx, "up")
    assert "belongs to another account" in str(e.value) and ctx.bucket in str(e.value)
    stub.add_client_error("head_bucket", "404", http_status_code=404)  # no such bucket: fine
    with stub:
        stack.preflight(ctx, "up")


def test_cloudformations_rollback_names_the_first_failed_resource():
    """The events ``up`` reads after a failed change set (newest first, as
    ``describe_stack_events`` lists them; moto never rolls back, so they are written here)."""

    def ev(logical, kind, status, reason=""):
        return {
            "LogicalResourceId": logical,
            "ResourceType": kind,
            "ResourceStatus": status,
            "ResourceStatusReason": reason,
        }

    stack_t = "AWS::CloudFormation::Stack"
    events = [
        ev("fedyolo-x", stack_t, "UPDATE_ROLLBACK_COMPLETE"),
        ev("ClientGroup", "AWS::AutoScaling::AutoScalingGroup", "UPDATE_COMPLETE"),
        ev("fedyolo-x", stack_t, "UPDATE_ROLLBACK_IN_PROGRESS", "The following resource(s) failed"),
        ev(
            "ClientGroup",
            "AWS::AutoScaling::AutoScalingGroup",
            "UPDATE_FAILED",
            "Resource update cancelled",
        ),
        ev(
            "ServerLaunchTemplate",
            "AWS::EC2::LaunchTemplate",
            "UPDATE_FAILED",
            "Invalid\n instance type m9.huge",
        ),
        ev("fedyolo-x", stack_t, "UPDATE_IN_PROGRESS", "User Initiated"),
        ev("Old", "AWS::EC2::Subnet", "CREATE_FAILED", "an earlier operation"),
    ]
    assert stack.first_failure(events) == (
        "ServerLaunchTemplate (AWS::EC2::LaunchTemplate): Invalid instance type m9.huge"
    )
    assert stack.first_failure(events[:1]) == "no resource reported a failure"


def test_down_keeps_the_state_unless_asked_and_deletes_keys_and_claims(aws, capsys):
    from fl_server.cli import main

    vpc = own_vpc(aws, "10.13.0.0/16")
    args = ["name=down1", f"region={REGION}", "ami=ami-1", *vpc]
    assert main(["deploy", "aws", "up", *args]) == 0
    ctx = stack.Context(settings("down1", *vpc), aws)
    s3, ssm = aws.client("s3"), aws.client("ssm")
    # moto ignores the template's VersioningConfiguration (AWS applies it): turned on here
    s3.put_bucket_versioning(Bucket=ctx.bucket, VersioningConfiguration={"Status": "Enabled"})
    for body in (b"round 1", b"round 2"):  # two versions of the model
        s3.put_object(Bucket=ctx.bucket, Key="state/fleet/sync.json", Body=body)
    ssm.put_parameter(Name="/fedyolo/down1/client/claims/0", Value="i-0abc", Type="String")
    assert main(["deploy", "aws", "down", *args]) == 0
    assert "state bucket kept" in capsys.readouterr().out
    assert stack.describe(ctx) is None
    assert not ssm.get_parameters_by_path(Path="/fedyolo/down1/", Recursive=True)["Parameters"]
    versions = s3.list_object_versions(Bucket=ctx.bucket)["Versions"]
    assert len(versions) == 2  # the model and its history survive the stack
    # a new stack of the same name would fail on the kept bucket: refused before anything
    assert main(["deploy", "aws", "up", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"the state bucket {ctx.bucket} exists" in err
    assert stack.describe(ctx) is None
    assert main(["deploy", "aws", "down", *args, "--delete-state"]) == 0
    assert ctx.bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_status_reads_drift_groups_and_a_federations_metrics(aws, tmp_path):
    from inprocess import run_inprocess

    vpc = own_vpc(aws, "10.14.0.0/16")
    cfg = settings("fed1", *vpc)
    stack.up(cfg)
    os.environ["FEDYOLO_AWS_DEPLOYMENT"] = "fed1"  # a tiny federation publishes its rounds
    try:
        run, _ = run_inprocess(
            tmp_path,
            ["federation.rounds=2", "hooks=[deploy.aws.cloudwatch:RoundMetrics]"],
            clients=2,
            name="cw",
        )
    finally:
        del os.environ["FEDYOLO_AWS_DEPLOYMENT"]
    last = json.loads(run.metrics.read_text().splitlines()[-1])
    st = stack.status(cfg)
    assert st["status"] == "CREATE_COMPLETE"
    assert st["federation"]["round"] == 2
    assert st["federation"]["map50_95"] == pytest.approx(last["map50_95"])
    assert st["groups"]["fed1-clients"] == {"desired": 0, "in_service": 0, "min": 0, "max": 4}
    # moto has no drift detection: said in one line, not a failure
    assert st["drift"].startswith("drift: not available from this endpoint (")
    assert "\n" not in st["drift"]
    assert stack.down(cfg, delete_state=True) == []


def _state_env(monkeypatch, cfg, aws):
    ctx = stack.Context(cfg, aws)
    url = f"s3://{ctx.bucket}/{cfg.state_prefix}"
    monkeypatch.setenv(s3state.ENV_URL, url)
    monkeypatch.setenv(s3state.ENV_KEY_PARAMETER, f"/fedyolo/{cfg.name}/server/state/key")
    return ctx.bucket, url


def test_the_servers_copy_in_s3_resumes_a_run_after_its_instance_is_lost(
    aws, tmp_path, monkeypatch
):
    from inprocess import InProcessGrid, run_inprocess

    from fl_server.config import compose, to_yaml
    from fl_server.server_app import serve

    cfg = settings("st1", *own_vpc(aws, "10.15.0.0/16"))
    stack.up(cfg)  # the bucket and the signing key (an SSM SecureString only the server reads)
    bucket, url = _state_env(monkeypatch, cfg, aws)
    # moto ignores the template's VersioningConfiguration (AWS applies it): turned on here
    aws.client("s3").put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    run, _ = run_inprocess(
        tmp_path, ["federation.rounds=2", "hooks=[deploy.aws.s3state:StateSync]"], 2, name="s3run"
    )
    before = run.rounds()
    s3 = aws.client("s3")
    doc = json.loads(s3.get_object(Bucket=bucket, Key="state/s3run/sync.json")["Body"].read())
    assert {"server_state.npz", "metrics.jsonl", "best.pt", "config.yaml"} <= set(doc["files"])
    assert not any(f.startswith(("data/client_", ".work")) for f in doc["files"])  # no client image
    held_out = [f for f in doc["files"] if f.startswith("data/server_val/")]
    assert held_out
    # the bucket holds exactly the objects of the last two manifests (the bucket is versioned:
    # the one before is the previous version of sync.json); the rest were dropped
    versions = s3.list_object_versions(Bucket=bucket, Prefix="state/s3run/sync.json")["Versions"]
    assert len(versions) == 3  # after round 1, round 2, and at the end
    assert versions[0]["IsLatest"]  # S3 lists the newest version first
    prev = s3.get_object(
        Bucket=bucket, Key="state/s3run/sync.json", VersionId=versions[1]["VersionId"]
    )
    prev_files = json.loads(prev["Body"].read())["files"]
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="state/s3run/objects/")["Contents"]
    assert {o["Key"].rsplit("/", 1)[1] for o in listed} == {
        e["sha256"] for e in [*doc["files"].values(), *prev_files.values()]
    }

    # the instance is gone: only the clients' shards (on the clients) are left
    for p in sorted(run.path.iterdir()):
        if p.name != "data":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in (run.path / "data").iterdir():
        if not p.name.startswith("client_"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    monkeypatch.chdir(tmp_path)  # resume=s3://... fetches into ./runs/<run>
    rcfg = compose([f"resume={url}/s3run", "federation.rounds=3"])
    assert Path(rcfg.resume) == (tmp_path / "runs" / "s3run").resolve()
    run.config.write_text(to_yaml(rcfg))
    serve(InProcessGrid(2), run.path)
    after = run.rounds()
    assert [r["round"] for r in after] == [1, 2, 3]
    assert [r["map50_95"] for r in after[:2]] == [r["map50_95"] for r in before]
    resumed = [e for e in _events(run) if e["kind"] == "resume"]
    assert resumed and resumed[0]["from_round"] == 3
    doc = json.loads(s3.get_object(Bucket=bucket, Key="state/s3run/sync.json")["Body"].read())
    assert doc["round"] == 3 and "summary.json" in doc["files"]
    assert stack.down(cfg, delete_state=True) == []


def _events(run):
    return [json.loads(x) for x in run.events.read_text().splitlines()]


class _Boom:
    """A pickle that would create a file if anything unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_tampered_copy_in_s3_is_refused_and_runs_nothing(aws, tmp_path, monkeypatch):
    import pickle

    import numpy as np

    from fl_server import state
    from fl_server.config import ConfigError, compose
    from fl_server.run_dir import RunDir

    s3 = aws.client("s3")
    s3.create_bucket(Bucket="tamper", CreateBucketConfiguration={"LocationConstraint": REGION})
    monkeypatch.setenv(s3state.ENV_KEY, "k" * 40)
    run = RunDir(tmp_path / "src" / "r1")
    run.path.mkdir(parents=True)
    run.config.write_text("name: r1\n")
    (run.path / "data" / "client_0").mkdir(parents=True)
    (run.path / "data" / "client_0" / "img.jpg").write_bytes(b"client pixels")
    w = np.arange(5, dtype=np.float32)
    state.save(run.state, {"round": 1, "weights": w, "strategy": None, "best": (w, None)})
    sync = s3state.StateSync(run, url="s3://tamper/state")
    sync.push(1)
    doc = json.loads(s3.get_object(Bucket="tamper", Key="state/r1/sync.json")["Body"].read())
    assert set(doc["files"]) == {"config.yaml", "server_state.npz"}  # the client's image stays
    dest = tmp_path / "dst"

    def refused(match):
        with pytest.raises(s3state.SyncError, match=match):
            s3state.fetch("s3://tamper/state/r1", dest)
        assert not dest.exists() or not any(p.is_file() for p in dest.rglob("*"))

    good = s3state.fetch("s3://tamper/state/r1", tmp_path / "ok")
    assert good["round"] == 1 and (tmp_path / "ok" / "server_state.npz").read_bytes() == (
        run.state.read_bytes()
    )

    # 1. an object changed in the bucket
    obj = f"state/r1/objects/{doc['files']['server_state.npz']['sha256']}"
    body = bytearray(s3.get_object(Bucket="tamper", Key=obj)["Body"].read())
    body[100] ^= 0xFF
    s3.put_object(Bucket="tamper", Key=obj, Body=bytes(body))
    refused("does not match its sha256")

    # 2. the manifest pointed at another object, by someone without the key
    marker = tmp_path / "executed"
    evil = pickle.dumps(_Boom(marker))
    sha = __import__("hashlib").sha256(evil).hexdigest()
    s3.put_object(Bucket="tamper", Key=f"state/r1/objects/{sha}", Body=evil)
    forged = dict(
        doc, files=dict(doc["files"], **{"server_state.npz": {"sha256": sha, "size": len(evil)}})
    )
    s3.put_object(Bucket="tamper", Key="state/r1/sync.json", Body=json.dumps(forged).encode())
    refused("signature does not match")

    # 3. a path out of the run directory, even signed
    key = s3state.load_key()
    bad = dict(doc, files=dict(doc["files"], **{"../escape": doc["files"]["config.yaml"]}))
    bad["hmac"] = s3state._signature(key, bad)
    s3.put_object(Bucket="tamper", Key="state/r1/sync.json", Body=json.dumps(bad).encode())
    refused("never has")

    # 4. even with the key, a pickle in place of the state is data that is refused, never run
    forged["hmac"] = s3state._signature(key, forged)
    s3.put_object(Bucket="tamper", Key="state/r1/sync.json", Body=json.dumps(forged).encode())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="not a readable fedyolo server state"):
        compose(["resume=s3://tamper/state/r1"])
    assert not marker.exists()

    # 5. no key: one line, before anything is read
    monkeypatch.delenv(s3state.ENV_KEY)
    with pytest.raises(s3state.SyncError, match="no signing key"):
        s3state.fetch("s3://tamper/state/r1", dest)


def test_the_user_data_cloudformation_renders_is_shellcheck_clean(aws):
    """The launch templates' user data as CloudFormation filled it in (moto's ``Fn::Sub``):
    the values in place, bash's own ``${...}`` unescaped (the script itself:
    ``tests/deploy/test_aws_userdata.py``)."""
    if shutil.which("shellcheck") is None:
        if os.environ.get("FEDYOLO_REQUIRE_SHELLCHECK"):
            pytest.fail("shellcheck is required here (FEDYOLO_REQUIRE_SHELLCHECK) but missing")
        pytest.skip("shellcheck not installed (Debian: apt install shellcheck)")
    stack.up(settings("ud1"))
    ip = stack.server_ip(stack.Context(settings("ud1"), aws))
    ec2 = aws.client("ec2")
    for role in ("server", "client"):
        data = ec2.describe_launch_template_versions(LaunchTemplateName=f"ud1-{role}")[
            "LaunchTemplateVersions"
        ][0]["LaunchTemplateData"]
        script = base64.b64decode(data["UserData"]).decode()
        assert f'SERVER_IP="{ip}"' in script
        # CloudFormation resolves every ${!x} to ${x}; moto 5.2.5 misses those whose braces
        # hold a quote (its regex stops at '"'), e.g. ${!STATE_URL#s3://"${!BUCKET}"/}
        script = script.replace("${!", "${")
        done = subprocess.run(
            ["shellcheck", "-s", "bash", "-"], input=script, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout


def test_bad_settings_are_one_line():
    with pytest.raises(AwsError, match="unknown setting 'clients.maxx'"):
        stack.load_settings(["clients.maxx=3"])
    with pytest.raises(AwsError, match="min <= desired <= max"):
        stack.load_settings(["clients.desired=9"])


# -- pushing the images: the docker SDK against a real registry ----------------------------------
def _need(env: str, problem: str | None, what: str):
    if problem:
        if os.environ.get(env) == "1":
            pytest.fail(f"{what} is required here but {problem}")
        pytest.skip(f"{what}: {problem}")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Debian's docker-registry (the Distribution registry) on 127.0.0.1: what ECR speaks."""
    import socket
    import time
    import urllib.request

    docker = pytest.importorskip("docker")
    try:
        docker.from_env().ping()
        problem = None
    except Exception as e:  # noqa: BLE001
        problem = f"no Docker engine ({e})"
    _need("FEDYOLO_REQUIRE_DOCKER", problem, "pushing images")
    binary = shutil.which("docker-registry")
    _need("FEDYOLO_REQUIRE_REGISTRY", None if binary else "no docker-registry", "pushing images")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tmp_path_factory.mktemp("registry")
    conf = root / "config.yml"
    conf.write_text(
        "version: 0.1\nlog: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    proc = subprocess.Popen([binary, "serve", str(conf)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/v2/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def _tiny_image(client, tag: str) -> None:
    """A two-file image built from scratch (nothing pulled)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (
            ("Dockerfile", b"FROM scratch\nCOPY hello /hello\n"),
            ("hello", tag.encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True)


def test_push_puts_both_images_into_the_registry_with_the_docker_sdk(aws, registry):
    import urllib.request

    import docker

    from deploy.aws import ecr

    client = docker.from_env()
    local = {"server": "fedyolo-test/push-server:1", "client": "fedyolo-test/push-client:1"}
    for tag in local.values():
        _tiny_image(client, tag)
    cfg_images = [
        f"images.server={registry}/fleet/server:0.1.0",
        f"images.client={registry}/fleet/client:0.1.0",
    ]
    cfg = settings("push1", *cfg_images)
    rows = []
    try:
        rows = ecr.push(cfg, local=local)
        assert [(r["role"], r["action"]) for r in rows] == [
            ("server", "pushed"),
            ("client", "pushed"),
        ]
        for r in rows:  # the registry serves the manifest under the digest the push reported
            repo = r["target"].split("/", 1)[1].rsplit(":", 1)[0]
            req = urllib.request.Request(
                f"http://{registry}/v2/{repo}/manifests/0.1.0",
                headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.headers["Docker-Content-Digest"] == r["digest"]

        # ECR: a tag already in the (immutable) repository is not pushed again; a push that
        # fails (no route to this account's registry from here) is one line naming the image
        ecr_cfg = settings("push2", *own_vpc(aws, "10.16.0.0/16"))
        stack.up(ecr_cfg)
        from importlib.metadata import version

        ecr_client = aws.client("ecr")
        media = "application/vnd.docker.distribution.manifest.v2+json"
        manifest = json.dumps({"schemaVersion": 2, "mediaType": media, "layers": []})
        ecr_client.put_image(
            repositoryName="push2/server", imageManifest=manifest, imageTag=version("fedyolo")
        )
        with pytest.raises(AwsError, match=r"deploy aws push: .*dkr\.ecr.*push2/client"):
            ecr.push(ecr_cfg, local=local)
        ecr_client.batch_delete_image(  # moto ignores EmptyOnDelete (AWS empties it)
            repositoryName="push2/server", imageIds=[{"imageTag": version("fedyolo")}]
        )
        assert stack.down(ecr_cfg, delete_state=True) == []
        with pytest.raises(AwsError, match="no ECR repository push2/server"):
            ecr.push(ecr_cfg, local=local)
        with pytest.raises(AwsError, match="no local image nothing:here"):
            ecr.push(cfg, local={"server": "nothing:here"})
        arm = settings("push1", *cfg_images, "clients.arch=arm64")
        with pytest.raises(AwsError, match="is a x86_64 image, clients.arch is arm64"):
            ecr.push(arm, local=local)  # this machine's images are x86_64
    finally:
        for tag in [*local.values(), *(r["target"] for r in rows)]:
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.remove(tag, force=True)
