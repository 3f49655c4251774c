"""``engine=superlink``: a prepared run submitted to a SuperLink that already runs, as the EC2
server instance does it. Here the fleet is on loopback: a TLS SuperLink with
``--enable-supernode-auth`` and two SuperNodes, started with ``deploy.local``'s helpers; the
SuperNodes bring their own data (node config ``data-path``), the server holds only its held-out
set (``data.partition=none``). ``fedyolo run engine=superlink`` registers the slots' keys and
follows the run; a second run registers the same keys again and completes too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_helpers import TINY, start_fedyolo  # noqa: E402

from deploy.compose import export_shard  # noqa: E402
from deploy.local import (  # noqa: E402
    ProcessGroup,
    _bin,
    flwr_env,
    free_port,
    make_security,
    node_names,
    wait_for_port,
)
from fl_server.cli import main  # noqa: E402


def registered(env: dict[str, str]) -> int:
    """How many SuperNodes the SuperLink knows (``flwr supernode ls``)."""
    done = subprocess.run(
        [_bin("flwr"), "supernode", "ls", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        return len(json.loads(done.stdout)["nodes"])
    except (ValueError, KeyError):
        return 0


class Fleet:
    """A loopback fleet as on EC2: a TLS SuperLink with node authentication that ``fedyolo
    run engine=superlink`` submits to, two SuperNodes with their own data (``data-path``)."""

    def __init__(self, tmp_path: Path, tiny_data: Path):
        self.tmp = tmp_path
        self.part = tmp_path / "part"
        assert main(["data", "partition", str(tiny_data), str(self.part), "--clients", "2"]) == 0
        self.server_data = tmp_path / "server-data"  # what the server instance syncs: real files
        export_shard(self.part / "server_val", self.server_data)
        self.nodes = node_names(2)
        hosts = ["127.0.0.1", "localhost"]
        self.security = make_security(tmp_path / "secrets", hosts, self.nodes, False)
        self.port = free_port()
        home = tmp_path / "link-home"
        home.mkdir()
        self.env = flwr_env(home, f"127.0.0.1:{self.port}", self.security)
        self.group = ProcessGroup(tmp_path / "logs", flwr_home=str(home))
        self.engine = [
            f"engine.address=127.0.0.1:{self.port}",
            f"engine.root_ca={self.security.root_ca}",
            f"engine.public_keys={tmp_path / 'secrets' / 'supernodes'}",
            "engine.startup_timeout=120",
        ]
        self.started: list[subprocess.Popen] = []

    def link(self, *extra: str) -> subprocess.Popen:
        proc = self.group.start(
            "superlink",
            [_bin("flower-superlink"), *self.security.superlink, "--host", "127.0.0.1",
             "--port", str(self.port), "--disable-runtime-dependency-installation", *extra],
            self.env,
        )  # fmt: skip
        wait_for_port("127.0.0.1", self.port, 120, proc)
        return proc

    def supernodes(self, run: subprocess.Popen) -> None:
        deadline = time.monotonic() + 120
        while registered(self.env) < 2:  # the engine registered the slots' keys
            assert run.poll() is None and time.monotonic() < deadline, "keys not registered"
            time.sleep(1)
        for i, name in enumerate(self.nodes):  # the client instances: own data, own key
            shard = self.part / f"client_{i}" / "data.yaml"
            self.group.start(
                name,
                [_bin("flower-supernode"), *self.security.supernode(name), "--superlink",
                 f"127.0.0.1:{self.port}", "--port", str(free_port()), "--node-config",
                 f"partition-id={i} num-partitions=2 data-path={json.dumps(str(shard))}"],
                {**self.env, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip

    def run(self, name: str, rounds: int = 1) -> subprocess.Popen:
        args = [
            "run",
            *[o for o in TINY if not o.startswith("federation.rounds")],
            f"federation.rounds={rounds}",
            f"name={name}",
            f"output.dir={self.tmp / 'runs'}",
            f"data.cache_dir={self.tmp / 'cache'}",
            f"data.path={self.server_data / 'data.yaml'}",
            "data.partition=none",
            "engine=superlink",
            *self.engine,
        ]
        log = (self.tmp / f"{name}.log").open("w")
        self.started.append(start_fedyolo(args, self.tmp, stderr=log))
        return self.started[-1]

    def finished(self, proc: subprocess.Popen, name: str, rounds: int = 1) -> str:
        proc.wait(timeout=600)
        err = (self.tmp / f"{name}.log").read_text()
        assert proc.returncode == 0, err[-3000:]
        check_completed(self.tmp / "runs" / name, rounds)
        return err

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
        self.group.stop()


@pytest.fixture
def fleet(tmp_path, tiny_data):
    f = Fleet(tmp_path, tiny_data)
    yield f
    f.close()


@pytest.mark.e2e
def test_the_engine_registers_the_keys_submits_and_follows_twice(fleet):
    first = fleet.run("first")  # it waits for a SuperLink that is not up yet
    time.sleep(2)
    fleet.link()
    fleet.supernodes(first)
    assert "2 node keys registered (0 already were)" in fleet.finished(first, "first")
    # the same fleet, a new run (a replacement server, a re-run): the same keys again
    second = fleet.run("second")
    assert "0 node keys registered (2 already were)" in fleet.finished(second, "second")


@pytest.mark.e2e
def test_a_superlink_restarted_mid_run_gets_the_run_again_and_it_completes(fleet):
    """The SuperLink is killed after round 1 and started again on its database (as its
    container restarts on the server instance): the engine resubmits the run as a resume."""
    from deploy.local import kill_tree
    from fl_server.run_dir import read_jsonl

    database = f"--database={fleet.tmp / 'superlink.db'}"
    link = fleet.link(database)
    run = fleet.run("restart", rounds=3)
    fleet.supernodes(run)
    metrics = fleet.tmp / "runs" / "restart" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not read_jsonl(metrics):
        assert run.poll() is None and time.monotonic() < deadline, "no round 1"
        time.sleep(0.5)
    kill_tree(link.pid)  # its ServerApp with it
    fleet.link(database)
    err = fleet.finished(run, "restart", rounds=3)
    assert "the SuperLink restarted mid-run" in err and "stopped Flower run" in err, err[-3000:]
    events = read_jsonl(fleet.tmp / "runs" / "restart" / "events.jsonl")
    assert len([e for e in events if e["kind"] == "resume"]) == 1


def check_completed(run: Path, rounds: int = 1) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(1, rounds + 1))
    # both slots trained, each on its own data (after a restart, a round may start before both
    # SuperNodes are back: the first round is checked)
    assert sorted(c["id"] for c in lines[0]["clients"]) == [0, 1], lines[0]
    manifest = json.loads((run / "manifest.json").read_text())["data"]
    assert manifest["clients_own_data"] is True
    assert not list((run / "data").glob("client_*"))  # the server never had a client's shard


def test_a_superlink_that_never_comes_up_is_one_line(tmp_path, tiny_data):
    from e2e_helpers import fedyolo

    from deploy.certs import make_tls

    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "supernode-0.pub").write_text("ssh-ed25519 AAAA")
    proc = fedyolo(
        ["run", *TINY, "name=down", f"output.dir={tmp_path / 'runs'}",
         f"data.cache_dir={tmp_path / 'cache'}", "engine=superlink",
         f"engine.address=127.0.0.1:{free_port()}", f"engine.root_ca={tls.ca_cert}",
         f"engine.public_keys={keys}", "engine.startup_timeout=2"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]  # the run ended failed, as with any engine
    last = proc.stderr.strip().splitlines()[-1]
    assert "engine.address=127.0.0.1:" in last and "is the SuperLink up?" in last, last


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"address": "superlink"}, "engine.address='superlink': give host:port"),
        ({"root_ca": ""}, "engine.root_ca is not set: give the CA certificate"),
        ({"root_ca": "nowhere.crt"}, "nowhere.crt' does not exist"),
        ({"keys_dir": ""}, "engine.public_keys is not set"),
        ({"keys_dir": "empty"}, "no *.pub node public key there"),
        ({"app": "empty"}, "has no pyproject.toml: give the fedyolo source folder"),
    ],
)
def test_bad_engine_settings_are_one_line_before_anything_starts(tmp_path, change, line):
    from deploy import DeployError
    from deploy.certs import make_tls
    from deploy.superlink import run_on_superlink

    (tmp_path / "empty").mkdir()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "supernode-0.pub").write_text("ssh-ed25519 AAAA")
    given = {
        "address": "127.0.0.1:9092",
        "root_ca": str(make_tls(tmp_path / "tls", ["127.0.0.1"]).ca_cert),
        "keys_dir": str(tmp_path / "keys"),
        "app": str(Path(__file__).resolve().parents[2]),
        **{k: v and str(tmp_path / v) if k != "address" else v for k, v in change.items()},
    }
    with pytest.raises(DeployError) as got:
        run_on_superlink(
            tmp_path / "run",
            address=given["address"],
            root_ca=Path(given["root_ca"]),
            keys_dir=Path(given["keys_dir"]),
            startup_timeout=1,
            app=Path(given["app"]),
        )
    assert line in str(got.value) and "\n" not in str(got.value)
    assert not (tmp_path / "run").exists()  # nothing written
