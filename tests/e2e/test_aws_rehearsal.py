"""The EC2 boot path, run on this machine (``fedyolo deploy aws rehearse``, issue 30 item 5).

The deployment's template is created by ``up`` on moto's server, the images are pushed to Debian's
docker-registry, the data is uploaded to (moto's) S3, and every instance of the two groups boots
from its launch template's user data, unchanged: a federation forms with no operator action; the
server instance is destroyed mid-run, the group replaces it, and the new instance resumes the run
from its S3 state by itself. Needs root (the boot script hands keys to the containers' user),
Docker, docker-registry and the AWS CLI (``make .venv-aws``); CI requires it
(``FEDYOLO_REQUIRE_REHEARSAL=1``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

pytestmark = [pytest.mark.e2e, pytest.mark.containers]


def _problem() -> str | None:
    from deploy.aws import AwsError, rehearse

    if os.geteuid() != 0:
        return "not root (the boot script chowns keys to the containers' user, as cloud-init)"
    if shutil.which("docker-registry") is None:
        return "no docker-registry (Debian: apt install docker-registry)"
    try:
        rehearse.aws_cli()
    except AwsError as e:
        return str(e)
    return None


@pytest.fixture
def rehearsal_ready(docker_engine, images):
    problem = _problem()
    if problem:
        if os.environ.get("FEDYOLO_REQUIRE_REHEARSAL") == "1":
            pytest.fail(f"the AWS rehearsal is required here but {problem}")
        pytest.skip(f"AWS rehearsal skipped: {problem}")
    return images


def test_instances_boot_into_a_federation_that_survives_its_server(tmp_path, rehearsal_ready):
    from deploy.aws.rehearse import Options, rehearse
    from fl_server.engines import EventKind, RunDir, Status

    out = tmp_path / "rehearsal"
    result = rehearse(Options(out=out, rounds=3, replace_after=1, clients=2))

    # the federation formed and finished by itself, across a server replacement
    assert result["status"] == Status.COMPLETED
    assert result["rounds"] == 3
    assert result["client_instances"] == 2
    assert result["server_replacements"] == 1
    assert result["resumed_from_s3"] is True
    assert result["operator_actions"] == 0
    assert json.loads((out / "rehearsal.json").read_text()) == result
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == Status.COMPLETED

    # what S3 holds is the whole run: rounds before the replacement kept, the rest resumed
    run = RunDir(out / "fetched")
    rounds = run.rounds()
    assert [int(r["round"]) for r in rounds] == [1, 2, 3]
    resumes = [e for e in run.read_events() if e["kind"] == EventKind.RESUME]
    assert len(resumes) == 1
    assert int(resumes[0]["round"]) >= result["replaced_after_round"]
    # each client trained its own slot's shard, in every round
    for r in rounds:
        assert sorted(int(c["id"]) for c in r["clients"]) == [0, 1], r

    # keys and state were the containers' user's, never world-readable
    for inst in (out / "instances").iterdir():
        secrets = inst / "etc/fedyolo/secrets"
        for key in secrets.glob("*.key"):
            st = key.stat()
            assert st.st_uid == 10001 and st.st_mode & 0o077 == 0, key


def test_a_killed_rehearsals_network_is_removed_and_a_foreign_one_avoided(docker_engine):
    """A rehearsal killed by SIGKILL leaves its network behind (a CI run once failed on "Pool
    overlaps with other one"): the next one removes it, and steps around a network it does not
    own."""
    import docker

    from deploy.aws import rehearse

    client = docker.from_env()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process holds now
    boot = rehearse._owner().rpartition(":")[0]

    def make(name: str, labels: dict[str, str] | None = None):
        subnet = rehearse._addresses(client).network  # the one a rehearsal would take now
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])
        net = client.networks.create(name, driver="bridge", ipam=ipam, labels=labels or {})
        return net, subnet

    foreign, _ = make(f"foreign-{os.getpid()}")
    try:
        stale, freed = make(f"rehearsal-{dead.pid}", {rehearse.OWNER_LABEL: f"{boot}:{dead.pid}"})
        ours = f"rehearsal-{os.getpid()}"
        with rehearse._network(client, ours) as where:
            assert where.network == freed  # the killed one's, removed; the foreign one avoided
            assert where.server_ip.startswith(freed.rsplit(".", 2)[0])
            names = {n.name for n in client.networks.list()}
            assert stale.name not in names and foreign.name in names and ours in names
        assert ours not in {n.name for n in client.networks.list()}
    finally:
        foreign.remove()
