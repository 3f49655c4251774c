"""The same tiny federation in Flower's deployment engine: real SuperLink and SuperNodes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from e2e_helpers import check_interrupted, check_run_dir, fedyolo, start_fedyolo, tiny_run_args

pytestmark = pytest.mark.e2e


def flower_processes(run: Path) -> list[psutil.Process]:
    """Flower processes started for this run (they carry FLWR_HOME=<run>/.flwr)."""
    home = str(run / ".flwr")
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("FLWR_HOME") == home:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def in_run_namespace(run: Path) -> list[str]:
    """The command prefix that runs a program in the run's private network namespace (where
    its SuperLink listens), as the user who started the run."""
    link = next(p for p in flower_processes(run) if "flower-superlink" in " ".join(p.cmdline()))
    if os.geteuid() == 0:
        return ["nsenter", "-t", str(link.pid), "-n", "--"]
    return ["nsenter", "-t", str(link.pid), "-U", "-n", "--preserve-credentials", "--"]


def test_deployment_run_completes_and_leaves_no_process(tmp_path):
    run = tmp_path / "runs" / "dep"
    # FedAdam on the server, 8-bit updates with error feedback from separate client processes,
    # each keeping its optimiser's momentum across rounds in its warm worker's state
    args = tiny_run_args(
        tmp_path,
        "dep",
        "engine=local-deployment",
        "strategy=fedadam",
        "transport=q8",
        "train.keep_momentum=true",
    )
    proc = fedyolo(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = check_run_dir(run, rounds=2, clients=2, kept_state=True, momentum=True)
    for r in rounds:
        assert all(c["bytes_up"] < 0.3 * c["bytes_down"] for c in r["clients"])
    # Each SuperNode trained its own shard: the two clients are the two partitions.

    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert sorted(c["id"] for c in first["clients"]) == [0, 1]
    assert (run / "logs" / "superlink.log").exists()
    # every Flower process ran in the run's own network namespace (engine.isolation=namespace)
    assert "in a private network namespace" in proc.stderr
    for i in (0, 1):  # one warm worker per SuperNode served every message (fl_client.worker):
        # its spare, started with the node and adopted by its first message; no other started
        spare = (run / "logs" / f"supernode-{i}-spare.log").read_text()
        assert len(re.findall(r"warm worker \d+ listening at .* as a spare", spare)) == 1, spare
        assert len(re.findall(r"spare worker \d+ adopted", spare)) == 1, spare[-3000:]
        log = (run / "logs" / f"supernode-{i}.log").read_text()
        assert not re.search(r"warm worker \d+ listening at ", log), log[-3000:]
    assert flower_processes(run) == []  # the workers included: they carry the run's FLWR_HOME


def test_ctrl_c_ends_the_deployment_run_interrupted_and_it_resumes(tmp_path):
    from fl_server.run_dir import read_jsonl

    run = tmp_path / "runs" / "stop"
    args = tiny_run_args(
        tmp_path, "stop", "federation.rounds=3", "federation.round_timeout=900",
        "engine=local-deployment",
    )  # fmt: skip
    proc = start_fedyolo(args, tmp_path, ctrl_c=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").exists():  # the federation really runs: round 1 done
            assert proc.poll() is None and time.monotonic() < deadline, "no round 1"
            time.sleep(0.5)
        assert flower_processes(run), "expected live Flower processes mid-run"
        # Ctrl-C reaches the driver only: every Flower process runs in a session of its own.
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)  # the round timeout is 900 s: not waited out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    check_interrupted(run)  # the ServerApp, in the SuperLink's process tree, ended it
    time.sleep(1)
    assert flower_processes(run) == []

    resumed = fedyolo(["run", f"resume={run}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["round"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert not (run / ".interrupt").exists()


def test_the_deployment_is_tls_and_admits_only_registered_supernodes(tmp_path):
    """A local user without the run's keys can neither talk plaintext nor join as a client,
    even from inside the run's network namespace (where no other user gets: see
    tests/security/test_hostile_neighbours.py)."""
    import tomllib

    from deploy.certs import make_node_keys
    from deploy.local import free_port

    run = tmp_path / "runs" / "sec"
    args = tiny_run_args(tmp_path, "sec", "federation.rounds=50", "engine=local-deployment")
    proc = start_fedyolo(args, tmp_path)
    intruder = None
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no round 1"
            time.sleep(1)
        home = run / ".flwr"
        assert oct(home.stat().st_mode & 0o777) == "0o700"
        link = tomllib.loads((home / "config.toml").read_text())["superlink"]["fedyolo-local"]
        address = link["address"]
        host, port = address.rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):  # not on this machine's loopback
            socket.create_connection((host, int(port)), timeout=5).close()
        inside = in_run_namespace(run)
        # 1. plaintext against the SuperLink: refused (it speaks TLS only)
        other = tmp_path / "other-home"
        other.mkdir()
        (other / "config.toml").write_text(
            f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{address}"\ninsecure = true\n'
        )
        env = {**os.environ, "FLWR_HOME": str(other)}
        flwr = str(Path(sys.executable).parent / "flwr")
        ls = subprocess.run(
            [*inside, flwr, "ls"], env=env, capture_output=True, text=True, timeout=60
        )
        said = ls.stdout + ls.stderr
        assert ls.returncode != 0 and "unavailable" in said, said[-500:]
        # 2. a SuperNode with the CA but a key the SuperLink never registered: not admitted
        key = make_node_keys(tmp_path / "intruder", ["intruder"])["intruder"]
        log = tmp_path / "intruder.log"
        with log.open("w") as out:
            intruder = subprocess.Popen(
                [
                    *inside,
                    str(Path(sys.executable).parent / "flower-supernode"),
                    "--superlink", address,
                    "--root-certificates", link["root-certificates"],
                    "--auth-supernode-private-key", str(key.private),
                    "--port", str(free_port("127.0.0.1")), "--max-retries", "1",
                ],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
            )  # fmt: skip
        deadline = time.monotonic() + 240  # generous: the federation shares the 2 cores
        refused = "Failed to activate SuperNode"
        while intruder.poll() is None and refused not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(1)
        said = log.read_text()
        # the SuperLink refuses to activate a node whose public key it has not registered
        assert refused in said and intruder.poll() != 0, said[-2000:]
        # the two registered clients go on training; nobody else ever took part
        time.sleep(1)
        rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(sorted(c["id"] for c in r["clients"]) == [0, 1] for r in rounds)
    finally:
        if intruder is not None and intruder.poll() is None:
            os.killpg(intruder.pid, signal.SIGKILL)
        if proc.poll() is None:
            # SIGTERM: a background job may have inherited SIGINT ignored (no job control)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            assert proc.returncode == 130  # SIGTERM, too, ends the run `interrupted`
            check_interrupted(run)
