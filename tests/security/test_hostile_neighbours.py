"""Another local user cannot take over a local deployment (issue 28, item 4).

Flower 1.41's Control API has no accounts and a ClientApp's token is on its command line
(``/proc/*/cmdline``, readable by every user), so ``engine=local-deployment`` runs every Flower
process of the run in a private network namespace: no other user reaches its ports. The first
test is the attack itself, by a real second account (``useradd``, needs root); the others are the
host that cannot give the isolation, and the explicit opt-out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_helpers import fedyolo, start_fedyolo, tiny_run_args  # noqa: E402

from deploy.local import EXPOSED  # noqa: E402

# What the other user runs (the system's Python, stdlib first): wait for a ClientApp's token
# on some process's command line, then try the SuperLink's Control port and the SuperNode's
# runtime API at the address that command line names, and pull the task with the token.
ATTACKER = r"""
import json, os, socket, sys, time
port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
out = {"uid": os.getuid()}
found = None
while found is None and time.monotonic() < deadline:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--token" in args and any(a.endswith("flwr-clientapp") for a in args[:2]):
            flag = "--runtime-api-address"
            addr = args[args.index(flag) + 1] if flag in args else None
            found = (args[args.index("--token") + 1], addr)
            break
    time.sleep(0.02)
out["token_seen"] = found is not None

def connect(host, p):
    try:
        socket.create_connection((host, int(p)), timeout=5).close()
        return "connected"
    except OSError as e:
        return f"{type(e).__name__}: {e}"

out["control"] = connect("127.0.0.1", port)
if found:
    token, addr = found
    try:
        from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS
        from flwr.proto.runtime_pb2 import PullTaskInputRequest
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient
    except ImportError as e:
        out["pull"] = f"not tried: {e}"
        addr = addr or "127.0.0.1:9094"
    else:
        addr = addr or SUPERNODE_DEFAULT_CLIENT_ADDRESS
        client = RuntimeHttpClient.from_server_address(
            server_address=addr, insecure=True, root_certificates=None,
            interceptors=[RuntimeTokenHttpInterceptor(token)],
        )
        try:
            res = client.PullTaskInput(PullTaskInputRequest())
            out["pull"] = "PULLED " + str(res)[:300]
        except Exception as e:
            out["pull"] = f"{type(e).__name__}: {e}"[:300]
    out["runtime_api"] = connect(*addr.rsplit(":", 1))
print(json.dumps(out))
"""


@pytest.fixture
def neighbour():
    """A second local account (plain ``useradd``), removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a second local user with useradd (CI runs as root)")
    for tool in ("useradd", "userdel", "runuser"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    name = f"fyn{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


def as_user(name: str, script: str, *args: str, timeout: float) -> dict:
    """``script`` run by ``name`` with the system's Python, Flower importable if it can read
    this environment's packages."""
    site = next(p for p in sys.path if p.endswith("site-packages"))
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin") or "python3"
    done = subprocess.run(
        ["runuser", "-u", name, "--", "env", f"PYTHONPATH={site}", "HOME=/tmp", python, "-c",
         script, *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_another_local_user_reaches_neither_the_control_api_nor_a_task(tmp_path, neighbour):
    run = tmp_path / "runs" / "hn"
    proc = start_fedyolo(
        tiny_run_args(tmp_path, "hn", "engine=local-deployment", "federation.round_timeout=300"),
        tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        config = run / ".flwr" / "config.toml"
        deadline = time.monotonic() + 240
        while not config.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no deployment"
            time.sleep(0.5)
        address = tomllib.loads(config.read_text())["superlink"]["fedyolo-local"]["address"]
        port = address.rsplit(":", 1)[1]
        seen = as_user(neighbour, ATTACKER, port, "300", timeout=360)
        _, err = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:  # SIGTERM first: fedyolo stops the run's Flower processes
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    assert seen["uid"] != 0
    # the token was there to steal (it is on a command line every user reads)...
    assert seen["token_seen"], seen
    # ...but no port of the run is reachable from the other user's network
    assert seen["control"].startswith("ConnectionRefusedError"), seen
    assert seen["runtime_api"].startswith("ConnectionRefusedError"), seen
    assert not seen.get("pull", "").startswith("PULLED"), seen
    assert "ConnectError" in seen["pull"] or seen["pull"].startswith("not tried"), seen
    # and the run was not disturbed
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def _fake_unshare(folder: Path) -> dict[str, str]:
    """An environment whose ``unshare`` fails as it does where user namespaces are off."""
    folder.mkdir()
    fake = folder / "unshare"
    fake.write_text(
        "#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_a_host_without_namespaces_refuses_to_start_and_says_what_is_exposed(tmp_path, monkeypatch):
    for k, v in _fake_unshare(tmp_path / "bin").items():
        monkeypatch.setenv(k, v)
    done = fedyolo(tiny_run_args(tmp_path, "ns", "engine=local-deployment"), cwd=tmp_path)
    said = done.stderr.strip().splitlines()[-1]  # the run ends failed, saying why in one line
    assert done.returncode != 0, done.stderr[-3000:]
    assert "engine=local-deployment: cannot make a private network namespace here" in said
    assert "n failed: unshare: unshare failed: Operation not permitted" in said  # -n or -r -n
    assert EXPOSED in said and "engine.isolation=none" in said
    assert not list((tmp_path / "runs" / "ns").glob("logs/superlink.log"))  # nothing started


def test_the_opt_out_says_what_it_exposes(tmp_path, monkeypatch):
    for k, v in _fake_unshare(tmp_path / "bin").items():  # not even tried
        monkeypatch.setenv(k, v)
    with socket.socket() as taken:  # a port the SuperLink cannot bind: it stops at once
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        done = fedyolo(
            tiny_run_args(
                tmp_path, "optout", "engine=local-deployment", "engine.isolation=none",
                f"engine.port={port}", "engine.startup_timeout=60",
            ),
            cwd=tmp_path,
        )  # fmt: skip
    warned = [line for line in done.stderr.splitlines() if "engine.isolation=none" in line]
    assert len(warned) == 1 and EXPOSED in warned[0], done.stderr[-3000:]
    assert (tmp_path / "runs" / "optout" / "logs" / "superlink.log").exists()  # it did start
