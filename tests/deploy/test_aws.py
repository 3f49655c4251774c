"""``fedyolo deploy aws`` against a real AWS API endpoint: moto's HTTP server on 127.0.0.1.

boto3 talks HTTP to it with real botocore serialization (``AWS_ENDPOINT_URL``); no decorator
mocks. What moto does not do: boot instances (its Auto Scaling group shows fake instances, no
user data runs), evaluate alarms, or run scaling policies. The user data is checked by
``shellcheck`` and against docker-compose.yml instead.
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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

from deploy.aws import TAG, AwsError, s3state, stack  # noqa: E402
from deploy.aws.userdata import CLIENT_ARGS, SERVER_ARGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REGION = "eu-west-1"  # the `aws` fixture's (tests/conftest.py)


def settings(name: str, *more: str):
    return stack.load_settings(
        [
            f"name={name}",
            f"region={REGION}",
            "ami=ami-12345678",
            "operator_cidrs=[203.0.113.7/32]",
            *more,
        ]
    )


def test_plan_creates_nothing_and_prices_the_instances(aws):
    cfg = settings("plan1")
    rows = stack.plan(cfg)
    assert rows and all(r["action"] == "create" for r in rows)
    assert stack.leftovers(cfg, aws) == []
    priced = {r["name"]: r["usd_per_hour"] for r in rows if r["usd_per_hour"]}
    assert set(priced) == {"server-group", "client-group"}
    # 1 on-demand + 1 spot c7i.xlarge at the table's prices, plus their volumes
    p = cfg.prices
    clients = p["c7i.xlarge"] * (1 + p.spot_factor) + 2 * 50 * p.ebs_gb_month / 730
    assert priced["client-group"] == pytest.approx(clients, abs=1e-3)


def test_up_creates_what_was_planned_locked_down(aws):
    cfg = settings("up1")
    planned = [(r["kind"], r["name"]) for r in stack.plan(cfg)]
    rows = stack.up(cfg)
    assert [(r["kind"], r["name"]) for r in rows] == planned
    assert all(r["action"] == "created" for r in rows)
    ids = {r["name"]: r["id"] for r in rows}
    ec2, asg = aws.client("ec2"), aws.client("autoscaling")

    groups = {
        g["AutoScalingGroupName"]: g
        for g in asg.describe_auto_scaling_groups(
            AutoScalingGroupNames=["up1-server", "up1-clients"]
        )["AutoScalingGroups"]
    }
    assert (groups["up1-server"]["MinSize"], groups["up1-server"]["MaxSize"]) == (1, 1)
    c = groups["up1-clients"]
    assert (c["MinSize"], c["DesiredCapacity"], c["MaxSize"]) == (1, 2, 4)
    dist = c["MixedInstancesPolicy"]["InstancesDistribution"]
    assert dist["OnDemandBaseCapacity"] == 1 and dist["OnDemandPercentageAboveBaseCapacity"] == 0
    assert {"Key": TAG, "Value": "up1"} in [
        {"Key": t["Key"], "Value": t["Value"]} for t in c["Tags"]
    ]

    # security groups: the Fleet port from the clients' group only, control from operators only
    sgs = {
        g["GroupName"]: g
        for g in ec2.describe_security_groups(GroupIds=[ids["server-sg"], ids["clients-sg"]])[
            "SecurityGroups"
        ]
    }
    assert sgs["up1-clients-sg"]["IpPermissions"] == []
    rules = {p["FromPort"]: p for p in sgs["up1-server-sg"]["IpPermissions"]}
    assert set(rules) == {9092, 9093}  # no SSH
    assert [g["GroupId"] for g in rules[9092]["UserIdGroupPairs"]] == [ids["clients-sg"]]
    assert rules[9092]["IpRanges"] == []
    assert [r["CidrIp"] for r in rules[9093]["IpRanges"]] == ["203.0.113.7/32"]

    # launch templates: IMDSv2, encrypted volumes, user data without secrets
    for role in ("server", "client"):
        v = ec2.describe_launch_template_versions(LaunchTemplateName=f"up1-{role}")[
            "LaunchTemplateVersions"
        ][0]["LaunchTemplateData"]
        assert v["MetadataOptions"]["HttpTokens"] == "required"
        assert all(b["Ebs"]["Encrypted"] for b in v["BlockDeviceMappings"])
        assert v["IamInstanceProfile"]["Name"] == f"up1-{role}"
        script = base64.b64decode(v["UserData"]).decode()
        assert f'ROLE="{role}"' in script and "PRIVATE KEY" not in script
        assert f'SERVER_IP="{stack.server_ip(_ctx(cfg, aws, ids))}"' in script

    # secrets: private material as SecureString
    ssm = aws.client("ssm")
    key = ssm.get_parameter(Name="/fedyolo/up1/client/slots/0/key")["Parameter"]
    assert key["Type"] == "SecureString"
    tls_key = ssm.get_parameter(Name="/fedyolo/up1/server/tls/superlink.key")["Parameter"]
    assert tls_key["Type"] == "SecureString"

    # IAM: no wildcard action, '*' resource only where AWS has no resource level
    iam = aws.client("iam")
    for role in ("server", "client"):
        doc = iam.get_role_policy(RoleName=f"up1-{role}", PolicyName="fedyolo")["PolicyDocument"]
        doc = json.loads(doc) if isinstance(doc, str) else doc
        for st in doc["Statement"]:
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert not any("*" in a for a in actions), st
            if st["Resource"] == "*":
                assert set(actions) <= {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData"}
        attached = iam.list_attached_role_policies(RoleName=f"up1-{role}")["AttachedPolicies"]
        assert [p["PolicyName"] for p in attached] == ["AmazonSSMManagedInstanceCore"]

    cw = aws.client("cloudwatch")
    alarms = {a["AlarmName"]: a for a in cw.describe_alarms(AlarmNamePrefix="up1-")["MetricAlarms"]}
    assert set(alarms) == {"up1-no-round", "up1-few-clients", "up1-rollback"}
    assert alarms["up1-no-round"]["TreatMissingData"] == "breaching"
    assert alarms["up1-few-clients"]["AlarmActions"] == [ids["add-client"]]
    board = json.loads(cw.get_dashboard(DashboardName="up1")["DashboardBody"])
    assert len(board["widgets"]) == 5

    # a second up changes nothing and duplicates nothing
    again = stack.up(cfg)
    assert {r["action"] for r in again} == {"exists"}
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    vpcs = ec2.describe_vpcs(Filters=[{"Name": f"tag:{TAG}", "Values": ["up1"]}])["Vpcs"]
    assert len(vpcs) == 1

    assert stack.down(cfg) == []
    assert stack.leftovers(cfg, aws) == []


def _ctx(cfg, sess, ids):
    ctx = stack.Context(cfg, sess)
    ctx.ids.update(ids)
    return ctx


def test_scale_and_status_read_back_a_federations_metrics(aws, tmp_path, capsys):
    from inprocess import run_inprocess

    from fl_server.cli import main

    cfg = settings("fed1")
    stack.up(cfg)
    assert main(["deploy", "aws", "scale", "3", "name=fed1", f"region={REGION}", "ami=ami-1"]) == 0
    g = aws.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=["fed1-clients"]
    )["AutoScalingGroups"][0]
    assert g["DesiredCapacity"] == 3
    with pytest.raises(AwsError, match="outside clients.min..max"):
        stack.scale(cfg, 9)

    # a tiny federation whose ServerApp publishes every round through the round hook
    os.environ["FEDYOLO_AWS_DEPLOYMENT"] = "fed1"
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
    assert st["federation"]["round"] == 2
    assert st["federation"]["map50_95"] == pytest.approx(last["map50_95"])
    assert len(st["groups"]["fed1-clients"]["instances"]) == 3
    assert main(["deploy", "aws", "status", "name=fed1", f"region={REGION}", "ami=ami-1"]) == 0
    assert '"round": 2' in capsys.readouterr().out
    assert main(["deploy", "aws", "down", "name=fed1", f"region={REGION}", "ami=ami-1"]) == 0


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

    cfg = settings("st1")
    stack.up(cfg)  # the bucket and the signing key (an SSM SecureString only the server reads)
    bucket, url = _state_env(monkeypatch, cfg, aws)
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
    assert stack.down(cfg) == []


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


def test_a_failed_up_leaves_nothing_down_cannot_remove(aws):
    cfg = settings("half1")
    with pytest.raises(AwsError, match="injected failure"):
        stack.up(cfg, fail_at=12)  # the 13th creation fails: VPC, groups, secrets exist
    assert len(stack.leftovers(cfg, aws)) == 12
    rows = stack.up(cfg)  # a re-run converges
    assert [r["action"] for r in rows].count("created") == len(rows) - 12
    assert stack.down(cfg) == []
    assert stack.leftovers(cfg, aws) == []
    assert stack.down(cfg) == []  # and down is idempotent


def test_user_data_is_shellcheck_clean_and_runs_the_compose_commands(aws):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert compose["superlink"]["command"] == SERVER_ARGS
    expected = [
        a.replace("superlink:9092", "${SERVER_IP}:${FLEET_PORT}")
        .replace("partition-id=0", "partition-id=${PARTITION_ID}")
        .replace("${FEDYOLO_CLIENTS:-2}", "${SLOTS}")
        .replace("${FEDYOLO_WARM_WORKER:-true}", "true")
        # a fleet's clients never opt in to fault injection (issue 28 item 7): no such key
        .replace(" fault-injection=${FEDYOLO_FAULT_INJECTION:-false}", "")
        for a in compose["supernode-0"]["command"]
    ]
    assert expected == CLIENT_ARGS
    if shutil.which("shellcheck") is None:
        if os.environ.get("FEDYOLO_REQUIRE_SHELLCHECK"):
            pytest.fail("shellcheck is required here (FEDYOLO_REQUIRE_SHELLCHECK) but missing")
        pytest.skip("shellcheck not installed (Debian: apt install shellcheck)")
    cfg = settings("ud1")
    rows = stack.up(cfg)
    ctx = _ctx(cfg, aws, {r["name"]: r["id"] for r in rows})
    from deploy.aws.userdata import render

    try:
        for role in ("server", "client"):
            script = render(ctx, role)
            done = subprocess.run(
                ["shellcheck", "-s", "bash", "-"], input=script, capture_output=True, text=True
            )
            assert done.returncode == 0, done.stdout
            for a in SERVER_ARGS if role == "server" else CLIENT_ARGS:  # as docker run's args
                assert '    "' + a.replace('"', '\\"') + '"' in script, a
    finally:
        assert stack.down(cfg) == []


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
    cfg = settings(
        "push1",
        f"images.server={registry}/fleet/server:0.1.0",
        f"images.client={registry}/fleet/client:0.1.0",
    )
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
        ecr_cfg = settings("push2")
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
        assert stack.down(ecr_cfg) == []
        with pytest.raises(AwsError, match="no ECR repository push2/server"):
            ecr.push(ecr_cfg, local=local)
        with pytest.raises(AwsError, match="no local image nothing:here"):
            ecr.push(cfg, local={"server": "nothing:here"})
    finally:
        for tag in [*local.values(), *(r["target"] for r in rows)]:
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.remove(tag, force=True)
