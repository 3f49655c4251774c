"""Private keys stay where they belong (issue 28, item 5).

Someone who can read the state bucket, or who gets code running in the SuperLink container,
must not get the run CA's key, a SuperNode's key or a client's images. The S3 copy is checked
against moto's real HTTP endpoint (boto3 serializes as it does against AWS); the container's
view is checked on the compose configuration fedyolo renders (no Docker engine needed).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

from deploy import compose as compose_engine  # noqa: E402
from deploy.aws import s3state  # noqa: E402
from deploy.certs import make_node_keys, make_tls  # noqa: E402
from deploy.local import make_security, node_names  # noqa: E402

REGION = "eu-west-1"  # the `aws` fixture's (tests/conftest.py)
KEY_MARK = b"PRIVATE KEY-----"


@pytest.fixture
def s3(aws, monkeypatch):
    monkeypatch.setenv(s3state.ENV_KEY, "k" * 40)
    return aws.client("s3")


def deployed_run(root: Path, clients: int = 3):
    """A run directory as a deployment engine leaves it: outputs, the state, the held-out set,
    the clients' shards, and the run's keys in its Flower home (made by the engines' code)."""
    from fl_server import state
    from fl_server.run_dir import RunDir

    run = RunDir(root)
    run.path.mkdir(parents=True)
    run.config.write_text("name: r1\n")
    run.metrics.write_text('{"round": 1}\n')
    w = np.arange(5, dtype=np.float32)
    state.save(run.state, {"round": 1, "weights": w, "strategy": None, "best": (w, None)})
    for i in range(clients):
        shard = run.data / f"client_{i}" / "images" / "train"
        shard.mkdir(parents=True)
        (shard / "a.jpg").write_bytes(b"client pixels %d" % i)
    val = run.data / "server_val" / "images"
    val.mkdir(parents=True)
    (val / "v.jpg").write_bytes(b"held-out pixels")
    secrets = run.path / ".flwr" / "secrets"
    make_security(secrets, ["superlink", "127.0.0.1"], node_names(clients), insecure=False)
    for i in range(clients):  # what the compose engine exports for each client container
        out = run.path / "compose" / "shards" / f"client_{i}"
        out.mkdir(parents=True)
        (out / "a.jpg").write_bytes(b"client pixels %d" % i)
    return run, secrets


def private_keys(secrets: Path) -> list[Path]:
    return [p for p in secrets.rglob("*") if p.is_file() and KEY_MARK in p.read_bytes()]


# -- S3 ------------------------------------------------------------------------------------
def test_the_state_copy_in_s3_holds_no_private_key(s3, tmp_path):
    s3.create_bucket(Bucket="keys", CreateBucketConfiguration={"LocationConstraint": REGION})
    run, secrets = deployed_run(tmp_path / "r1")
    assert len(private_keys(secrets)) == 5  # CA, SuperLink, 3 SuperNodes
    # a key kept anywhere else in the run directory is recognised by its content
    shutil.copy(secrets / "ca.key", run.path / "backup-of-the-ca")
    sync = s3state.StateSync(run, url="s3://keys/state")
    sync.on_round({"round": 1})
    sync.on_round({"round": 2})

    listed = s3.list_objects_v2(Bucket="keys")["Contents"]
    bodies = {o["Key"]: s3.get_object(Bucket="keys", Key=o["Key"])["Body"].read() for o in listed}
    leaked = [k for k, body in bodies.items() if KEY_MARK in body]
    assert leaked == []
    manifest = yaml.safe_load(bodies["state/r1/sync.json"])
    assert not [p for p in manifest["files"] if p.startswith((".flwr", "compose/", "data/c"))]
    assert "backup-of-the-ca" not in manifest["files"]
    assert {"config.yaml", "server_state.npz", "data/server_val/images/v.jpg"} <= set(
        manifest["files"]
    )
    assert not run.events.exists()  # no state_sync_failed: both rounds were copied


def test_a_restored_copy_is_private_and_never_restores_keys(s3, tmp_path, caplog):
    s3.create_bucket(Bucket="rest", CreateBucketConfiguration={"LocationConstraint": REGION})
    run, secrets = deployed_run(tmp_path / "r1")
    sync = s3state.StateSync(run, url="s3://rest/state")
    sync.push(1)
    dest = tmp_path / "new-instance" / "r1"
    s3state.fetch("s3://rest/state/r1", dest)
    assert (dest / "server_state.npz").read_bytes() == run.state.read_bytes()
    for p in [dest, *dest.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))

    # A copy that an older fedyolo wrote, keys included (signed with the state key): the keys
    # are not written back, and the warning says they leaked.
    key_rel = ".flwr/secrets/ca.key"
    body = (secrets / "ca.key").read_bytes()
    s3.put_object(Bucket="rest", Key="state/r1/objects/oldkey", Body=body)
    s3.put_object(Bucket="rest", Key="state/r1/objects/stray", Body=body)
    doc = yaml.safe_load(s3.get_object(Bucket="rest", Key="state/r1/sync.json")["Body"].read())
    import hashlib
    import json

    sha = hashlib.sha256(body).hexdigest()
    s3.put_object(Bucket="rest", Key=f"state/r1/objects/{sha}", Body=body)
    doc["files"][key_rel] = {"sha256": sha, "size": len(body)}
    doc["files"]["notes/node.key"] = {"sha256": sha, "size": len(body)}
    doc["hmac"] = s3state._signature(s3state.load_key(), doc)
    s3.put_object(Bucket="rest", Key="state/r1/sync.json", Body=json.dumps(doc).encode())
    old = tmp_path / "from-old-copy"
    with caplog.at_level(logging.WARNING, logger="fedyolo"):
        s3state.fetch("s3://rest/state/r1", old)
    assert (old / "server_state.npz").exists()
    assert private_keys(old) == []
    assert not (old / ".flwr").exists() and not (old / "notes" / "node.key").exists()
    said = [r.getMessage() for r in caplog.records if "private key" in r.getMessage()]
    assert len(said) == 1 and "2 private key file(s)" in said[0] and "leaked" in said[0]


# -- certificates and keys on disk ---------------------------------------------------------
def test_keys_that_exist_are_replaced_by_private_files(tmp_path):
    tls_dir, node_dir = tmp_path / "tls", tmp_path / "nodes"
    for folder, names in ((tls_dir, ["ca.key", "superlink.key"]), (node_dir, ["supernode-0"])):
        folder.mkdir(mode=0o755)
        for name in names:
            (folder / name).write_text("an old key, world-readable\n")
            os.chmod(folder / name, 0o644)
    held = (tls_dir / "ca.key").open("rb")  # someone opened the old file while it was 0644
    try:
        tls = make_tls(tls_dir, ["127.0.0.1"])
        keys = make_node_keys(node_dir, ["supernode-0"])
        assert held.read() == b"an old key, world-readable\n"  # never the new key
    finally:
        held.close()
    for secret in (tls_dir / "ca.key", tls.key, keys["supernode-0"].private):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
        assert KEY_MARK in secret.read_bytes()
    for public in (tls.ca_cert, tls.cert, keys["supernode-0"].public):
        assert stat.S_IMODE(public.stat().st_mode) == 0o644
    for folder in (tls_dir, node_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not list(tmp_path.rglob("*.writing"))


# -- the SuperLink container ---------------------------------------------------------------
def rendered(run_dir: Path, clients: int) -> tuple[dict[str, str], list[Path]]:
    """The environment and compose files the compose engine renders for this run."""
    env = {**compose_engine.mount_environment(run_dir), "FEDYOLO_CLIENTS": str(clients)}
    compose = yaml.safe_load(compose_engine.COMPOSE_FILE.read_text())
    extra = compose_engine.client_services(compose, clients)
    if not extra:  # as the engine: no override file when the base file's clients suffice
        return env, [compose_engine.COMPOSE_FILE]
    override = run_dir / "compose" / "compose.clients.yml"
    override.write_text(yaml.safe_dump({"services": extra}, sort_keys=False))
    return env, [compose_engine.COMPOSE_FILE, override]


def test_the_superlink_container_sees_its_own_key_the_outputs_and_the_held_out_set_only(
    tmp_path,
):
    run, secrets = deployed_run(tmp_path / "r1", clients=3)
    env, files = rendered(run.path, 3)
    mounts = compose_engine.service_mounts("superlink", env, files)
    seen = lambda p: compose_engine.visible_at(p, mounts)  # noqa: E731

    assert seen(secrets / "ca.key") is None
    for i in range(3):
        assert seen(secrets / "supernodes" / f"supernode-{i}") is None
        assert seen(run.data / f"client_{i}" / "images" / "train" / "a.jpg") is None
        assert seen(run.path / "compose" / "shards" / f"client_{i}" / "a.jpg") is None
    leaks = [
        p
        for p in run.path.rglob("*")
        if p.is_file() and seen(p) and KEY_MARK in p.read_bytes() and p.name != "superlink.key"
    ]
    assert leaks == []
    assert seen(secrets / "superlink.key") == "/secrets/superlink.key"
    assert seen(secrets / "ca.crt") == "/secrets/ca.crt"
    assert seen(run.state) == str(run.state)  # the run's outputs, at the host's path
    held_out = run.data / "server_val" / "images" / "v.jpg"
    assert seen(held_out) == str(held_out)
    by_target = {m.target: m for m in mounts}
    assert not by_target[str(run.path)].read_only  # the ServerApp writes its outputs
    assert by_target[str(run.data / "server_val")].read_only
    compose_engine.check_superlink_view(run.path, env, files)  # what the engine runs first


def test_a_compose_file_that_mounts_the_whole_run_directory_is_refused(tmp_path):
    run, _ = deployed_run(tmp_path / "r1", clients=2)
    env, files = rendered(run.path, 2)
    text = compose_engine.COMPOSE_FILE.read_text()
    masks = [line for line in text.splitlines() if "type: tmpfs" in line]
    assert len(masks) == 3
    for line in masks:  # the compose file before issue 28: the whole run directory
        text = text.replace(line + "\n", "")
    old = tmp_path / "docker-compose.yml"
    old.write_text(text)
    with pytest.raises(compose_engine.ComposeError, match="would read .* not the server's"):
        compose_engine.check_superlink_view(run.path, env, [old, *files[1:]])


def _compose_cli() -> list[str] | None:
    try:
        return compose_engine.compose_cli()
    except compose_engine.ComposeError:
        return None


@pytest.mark.skipif(
    _compose_cli() is None, reason="no compose CLI (docker compose, docker-compose)"
)
def test_compose_itself_renders_the_same_superlink_view(tmp_path):
    """The same view as compose renders it (``compose config``: the CLI, no engine)."""
    run, secrets = deployed_run(tmp_path / "r1", clients=2)
    env, files = rendered(run.path, 2)
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    args = [*_compose_cli(), "--env-file", str(env_file)]
    args += [a for f in files for a in ("--file", str(f))]
    done = subprocess.run([*args, "config"], capture_output=True, text=True, check=True)
    config = tmp_path / "rendered.yml"
    config.write_text(done.stdout)
    mounts = compose_engine.service_mounts("superlink", {}, [config])
    assert compose_engine.visible_at(secrets / "ca.key", mounts) is None
    assert (
        compose_engine.visible_at(run.data / "client_0" / "images" / "train" / "a.jpg", mounts)
        is None
    )
    assert compose_engine.visible_at(run.state, mounts) == str(run.state)
