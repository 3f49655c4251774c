"""The container tier: real images on a real Docker engine.

Runs when a Docker engine answers; otherwise every test here is skipped with the reason. CI sets
``FEDYOLO_REQUIRE_DOCKER=1`` (``.ci/run`` installs and starts the engine), and then a missing
engine is a failure, not a skip. Missing images are built once per session: from the registry
and the index, or offline (local base + wheelhouse) when ``FEDYOLO_IMAGES_OFFLINE=1`` or when the
online build fails where an offline one can be made.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from e2e_helpers import (
    check_best_reevaluates,
    check_run_dir,
    fedyolo,
    start_fedyolo,
    tiny_run_args,
    wait_for_rounds,
)

pytestmark = [pytest.mark.e2e, pytest.mark.containers]


def _docker(cli: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=300)


def _leftovers(cli: str, project: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    out = []
    for kind in ("container", "network", "volume"):
        ids = _docker(cli, kind, "ls", "--all" if kind == "container" else "--quiet", "--quiet",
                      "--filter", label).stdout.split()  # fmt: skip
        out += [f"{kind} {i}" for i in ids]
    return out


def test_client_image_is_lean_and_both_run_as_a_fixed_non_root_user(docker_engine, images):
    probe = (
        "import importlib.util as u, os; "
        "print(os.getuid(), [m for m in ('ray', 'optuna', 'boto3', 'onnx', 'onnxruntime', "
        "'clearml', 'docker') if u.find_spec(m)])"
    )
    client = _docker(docker_engine, "run", "--rm", "--entrypoint", "python3", images["client"],
                     "-c", probe)  # fmt: skip
    assert client.returncode == 0, client.stderr
    assert client.stdout.split("\n")[-2] == "10001 []", client.stdout
    imports = "import os, fl_server.server_app, ray, clearml; print(os.getuid())"
    server = _docker(docker_engine, "run", "--rm", "--entrypoint", "python3", images["server"],
                     "-c", imports)  # fmt: skip
    assert server.returncode == 0 and server.stdout.split("\n")[-2] == "10001", server.stderr
    labels = _docker(docker_engine, "image", "inspect", "--format",
                     "{{index .Config.Labels \"org.opencontainers.image.revision\"}} "
                     "{{.Config.Healthcheck.Test}}", images["client"]).stdout  # fmt: skip
    assert "unknown" not in labels.split()[0] and "deploy.health" in labels


def test_both_images_hold_exactly_the_locked_versions(docker_engine, images):
    """Every package in each image (its own record, /opt/fedyolo/build/pip-freeze.txt) is at the
    version deploy/docker/lock-amd64.txt pins: the same source installs the same packages."""
    from deploy.images import LOCK_AMD64

    def norm(line: str) -> tuple[str, str]:
        name, _, ver = line.partition("==")
        return name.lower().replace("_", "-"), ver

    lock = dict(norm(x) for x in LOCK_AMD64.read_text().splitlines() if "==" in x)
    for role, tag in images.items():
        done = _docker(docker_engine, "run", "--rm", "--entrypoint", "cat", tag,
                       "/opt/fedyolo/build/pip-freeze.txt")  # fmt: skip
        assert done.returncode == 0, done.stderr
        held = dict(norm(x) for x in done.stdout.splitlines() if "==" in x)
        assert len(held) > 30, done.stdout
        off = {n: (v, lock.get(n)) for n, v in held.items() if n != "fedyolo" and lock.get(n) != v}
        assert not off, f"{role} image: (held, locked) {off}"


def test_compose_federation_with_tls_and_node_auth(tmp_path, docker_engine, images):
    """2 clients x 2 rounds in containers: the run-directory contract of every engine, TLS and
    node authentication on, each client reading its own read-only shard, nothing left behind;
    each client's optimiser momentum kept across rounds in its container (train.keep_momentum);
    fine-tuning a checkpoint that lives outside the run, named by a relative path (the engine
    mounts it read-only into the SuperLink container at its absolute path)."""
    from deploy.compose import project_name
    from fl_client.model import build_model, save_checkpoint

    ckpt = save_checkpoint(build_model("fedyolo-tiny.yaml", ["a", "b"]),
                           tmp_path / "pretrained" / "start.pt", {}, {})  # fmt: skip
    run = tmp_path / "runs" / "box"
    args = tiny_run_args(tmp_path, "box", "engine=compose", "model.cfg=pretrained/start.pt",
                         "train.keep_momentum=true")  # fmt: skip
    proc = fedyolo(args, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # each client container keeps its optimiser's momentum across rounds
    check_run_dir(run, rounds=2, clients=2, kept_state=True, momentum=True)
    assert f"cfg: {ckpt}" in (run / "config.yaml").read_text()
    staged = yaml.safe_load((run / "compose" / "compose.inputs.yml").read_text())
    mount = {"type": "bind", "source": str(ckpt), "target": str(ckpt), "read_only": True}
    assert staged["services"]["superlink"]["volumes"] == [mount], staged
    link_log = (run / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://0.0.0.0:9092" in link_log  # TLS, not plain HTTP
    # node authentication: the two keys were registered, and exactly those nodes activated
    registered = set(re.findall(r"RegisterNode\] Created node_id=(\d+)", link_log))
    activated = set(re.findall(r"ActivateNode\] Activated node_id=(\d+)", link_log))
    assert len(registered) == 2 and activated == registered, (registered, activated)
    for i in (0, 1):
        log = (run / "logs" / f"supernode-{i}.log").read_text()
        # one warm worker per client container served both rounds (fl_client.worker): the
        # spare its entry point started with the node, adopted by the first message
        assert len(re.findall(r"warm worker \d+ listening at /tmp/", log)) == 1, log[-3000:]
        assert len(re.findall(r"spare worker \d+ adopted", log)) == 1, log[-3000:]
    check_best_reevaluates(run, tmp_path / "val")  # the container's best.pt, on the host
    env = (run / "compose.env").read_text()
    assert "FEDYOLO_SECRETS=" in env and "KEY" not in env.replace("FEDYOLO_", "")
    assert _leftovers(docker_engine, project_name(run.resolve())) == []


@contextlib.contextmanager
def _fedyolo_running(args: list[str], cwd: Path):
    """``fedyolo`` in the background for the block; then it must exit 0 (else it is stopped)."""
    proc = start_fedyolo(args, cwd, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)


def _wait_for_client_in_a_round(run: Path, client: int, proc: subprocess.Popen) -> int:
    """The first round after round 2 whose record counts ``client``'s update."""
    from fl_server.run_dir import read_jsonl

    while proc.poll() is None:
        rounds = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        for r in rounds[2:]:
            if client in [c["id"] for c in r["clients"]]:
                return r["round"]
        time.sleep(1)
    pytest.fail(f"fedyolo ended (exit {proc.returncode}) before client {client} rejoined")


def _container(cli: str, project: str, service: str) -> str:
    labels = [f"label=com.docker.compose.project={project}",
              f"label=com.docker.compose.service={service}"]  # fmt: skip
    found = _docker(cli, "ps", "--quiet", "--filter", labels[0], "--filter", labels[1])
    return found.stdout.split()[0]


def _intruder(cli: str, network: str, secrets: Path, image: str, *auth: str) -> tuple[int, str]:
    """A SuperNode container that tries to join with ``auth``; its exit code and log (one
    that does not end is removed, never left attached to the run's network)."""
    name = f"fedyolo-intruder-{os.getpid()}-{time.monotonic_ns()}"
    try:
        done = subprocess.run(
            [cli, "run", "--rm", "--name", name, "--network", network, "--user", "0",
             "-v", f"{secrets / 'ca.crt'}:/secrets/ca.crt:ro", "-v", f"{secrets}:/intruder:ro",
             image, "--superlink=superlink:9092", "--max-retries=2", "--max-wait-time=20",
             *auth],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        _docker(cli, "rm", "--force", name)
        pytest.fail(f"the intruder container {name} did not end within 180 s")
    return done.returncode, done.stdout + done.stderr


def test_compose_faults_crashed_client_rejoins_and_intruders_are_refused(
    tmp_path, docker_engine, images
):
    """Mid-run: a client container's process is killed (a crash: its restart policy brings it
    back, it rejoins and no round is lost or counted twice); a SuperNode whose key was never
    registered and one speaking plaintext are refused and never take part; an injected NaN
    update (``faults.*``, as in the other engines) is rejected and its round goes on."""
    from deploy.certs import make_node_keys
    from deploy.compose import project_name
    from fl_server.run_dir import read_jsonl

    run = tmp_path / "runs" / "crash"
    args = tiny_run_args(tmp_path, "crash", "engine=compose", "federation.clients=3",
                         "federation.rounds=12", "federation.round_timeout=300",
                         # fault injection works unchanged in this engine
                         "faults.client=2", "faults.round=6", "faults.kind=nan")  # fmt: skip
    project = project_name(run.resolve())
    with _fedyolo_running(args, tmp_path) as proc:
        # round 2 is under way, or (federation.overlap_eval: round 2 trained during round 1's
        # evaluation) round 2's aggregation or round 3's training
        wait_for_rounds(run, 1, proc)
        cid = _container(docker_engine, project, "supernode-1")
        pid = int(_docker(docker_engine, "inspect", "--format", "{{.State.Pid}}", cid).stdout)
        os.kill(pid, signal.SIGKILL)  # what the OOM killer does; not a `docker stop`
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the restart policy brings the container back
            state = _docker(docker_engine, "inspect", "--format",
                            "{{.RestartCount}} {{.State.Running}}", cid).stdout.split()  # fmt: skip
            if state and int(state[0]) >= 1 and state[1] == "true":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the killed client container was not restarted: {state}")
        network = f"{project.replace('-', '')}_federation"
        nets = _docker(docker_engine, "network", "ls", "--format", "{{.Name}}").stdout.split()
        network = next(n for n in nets if n.startswith(project) or n == network)
        keys = make_node_keys(tmp_path / "intruder", ["intruder"])
        secrets = run / ".flwr" / "secrets"
        (tmp_path / "intruder" / "ca.crt").write_bytes((secrets / "ca.crt").read_bytes())
        rc, log = _intruder(docker_engine, network, tmp_path / "intruder", images["client"],
                            "--root-certificates=/intruder/ca.crt",
                            f"--auth-supernode-private-key=/intruder/{keys['intruder'].private.name}",
                            "--node-config=partition-id=9 num-partitions=10")  # fmt: skip
        assert rc != 0, f"an unregistered SuperNode was not refused:\n{log[-2000:]}"
        plain = ["--insecure", "--node-config=partition-id=8 num-partitions=10"]
        rc, log = _intruder(docker_engine, network, tmp_path / "intruder", images["client"],
                            *plain)  # fmt: skip
        assert rc != 0, f"a plaintext SuperNode was not refused:\n{log[-2000:]}"
        # Nobody touches it again: the restarted container's entry point signs off the session
        # its killed SuperNode left (the node ID kept in its /state folder), so Flower takes the
        # key at once instead of after 2 missed heartbeats (up to 60 s).
        back = _wait_for_client_in_a_round(run, 1, proc)
        cid = _container(docker_engine, project, "supernode-1")
        restarts = _docker(docker_engine, "inspect", "--format", "{{.RestartCount}}", cid).stdout
        assert int(restarts) == 1, f"Docker restarted the client {restarts} times"
        # the health check of a client that is connected (its SuperNode up, its TLS link to the
        # SuperLink verified): healthy
        healthy = _container(docker_engine, project, "supernode-0")
        health = _docker(docker_engine, "inspect", "--format", "{{.State.Health.Status}}",
                         healthy).stdout.strip()  # fmt: skip
        assert health == "healthy", health
    log1 = (run / "logs" / "supernode-1.log").read_text()
    assert re.search(r"signed off node \d+'s dead session", log1), log1[-3000:]
    assert "flower-supernode exited" not in log1, log1[-3000:]  # taken at the first attempt
    link_log = (run / "logs" / "superlink.log").read_text()
    activated = re.findall(r"ActivateNode\] Activated node_id=(\d+)", link_log)
    assert len(activated) == 4 and len(set(activated)) == 3, activated  # 3 + the rejoin
    rounds = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rounds] == list(range(1, 13))
    failed = [(e["round"], e["client"]) for e in read_jsonl(run / "events.jsonl")
              if e["kind"] == "client_failed"]  # fmt: skip
    for r in rounds:
        ids = sorted(c["id"] for c in r["clients"])
        assert set(ids) <= {0, 1, 2} and len(ids) == len(set(ids)), (r["round"], ids)
        assert 0 in ids and not (1 in ids and (r["round"], 1) in failed)
        assert (2 in ids) == (r["round"] != 6), (r["round"], ids)  # its NaN update of round 6
    # killed in round k: recorded as failed there, once, and the round completed without it
    assert len(failed) == 1 and failed[0][1] == 1 and failed[0][0] in (2, 3), failed
    k = failed[0][0]
    assert 1 not in [c["id"] for c in rounds[k - 1]["clients"]], (k, rounds[k - 1]["clients"])
    rejected = [(e["round"], e["client"], e["reason"]) for e in read_jsonl(run / "events.jsonl")
                if e["kind"] == "update_rejected"]  # fmt: skip
    assert [r[:2] for r in rejected] == [(6, 2)] and "non-finite" in rejected[0][2], rejected
    present = [1 in [c["id"] for c in r["clients"]] for r in rounds]
    assert present[-1], f"the restarted client did not rejoin: {present}"
    assert all(present[back - 1 :]), (back, present)  # once back, in every later round
    assert _leftovers(docker_engine, project) == []


def test_superlink_container_restarted_mid_run_the_run_goes_on(tmp_path, docker_engine, images):
    """The SuperLink container restarts after round 2 (its ServerApp dies with it; its database
    is on a volume): the engine resubmits the run as a resume of its own directory, and the run
    completes with every round recorded once and every client in every round."""
    from deploy.compose import project_name
    from fl_server.run_dir import read_jsonl

    run = tmp_path / "runs" / "link"
    args = tiny_run_args(tmp_path, "link", "engine=compose", "federation.rounds=4")
    project = project_name(run.resolve())
    with _fedyolo_running(args, tmp_path) as proc:
        wait_for_rounds(run, 2, proc)
        cid = _container(docker_engine, project, "superlink")
        assert _docker(docker_engine, "restart", cid).returncode == 0
    check_run_dir(run, rounds=4, clients=2)
    resumes = [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["round"] in (2, 3), resumes
    assert _leftovers(docker_engine, project) == []
