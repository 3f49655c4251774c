"""A restarted client is taken back at once (``deploy.supernode``, the client image's entry point).

Real Flower processes on loopback: a TLS SuperLink with node authentication and one registered
key. A SuperNode that dies without signing off stays "online" on the SuperLink until it misses two
30 s heartbeats, and the same key is refused until then. The entry point signs the dead session
off (``DeactivateNode``, signed with the node's key) before it starts the SuperNode again, from
the node ID it remembered in memory (a crashed child) or in its state file (a restarted
container). The control: the same restart without the remembered ID is refused.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deploy.local import (
    ProcessGroup,
    _bin,
    flwr_env,
    free_port,
    make_security,
    register_nodes,
    wait_for_port,
)

REFUSED = "flower-supernode exited"
SIGNED_OFF = re.compile(r"signed off node (\d+)'s dead session")


class Link:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.security = make_security(tmp / "secrets", ["127.0.0.1"], ["supernode-0"], False)
        self.port = free_port()
        home = tmp / "home"
        home.mkdir()
        self.env = flwr_env(home, f"127.0.0.1:{self.port}", self.security)
        self.group = ProcessGroup(tmp / "logs", flwr_home=str(home))
        proc = self.group.start(
            "superlink",
            [_bin("flower-superlink"), *self.security.superlink, "--host", "127.0.0.1",
             "--port", str(self.port), "--disable-runtime-dependency-installation"],
            self.env,
        )  # fmt: skip
        wait_for_port("127.0.0.1", self.port, 120, proc)
        register_nodes(self.security, self.env)
        self.nodes: list[subprocess.Popen] = []

    def node(self, name: str, state: Path, *auth: str) -> tuple[subprocess.Popen, Path]:
        """The client image's entry point, as a container runs it."""
        log = self.tmp / f"{name}.log"
        auth = auth or tuple(self.security.supernode("supernode-0"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.supernode", *auth,
             "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port())],
            env={**self.env, "FEDYOLO_NODE_STATE": str(state)},
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            start_new_session=True,
        )  # fmt: skip
        self.nodes.append(proc)
        return proc, log

    def close(self) -> None:
        for proc in self.nodes:
            _kill_group(proc)
        self.group.stop()


def _kill_group(proc: subprocess.Popen) -> None:
    """Everything of a "container" at once (SIGKILL): nothing signs off."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=30)
    proc.wait(timeout=30)


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if re.search(pattern, text):
            return text
        assert proc.poll() is None, f"the entry point ended ({proc.returncode}):\n{text[-2000:]}"
        time.sleep(0.3)
    pytest.fail(f"{pattern!r} not in {log.name} within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


@pytest.fixture
def link(tmp_path):
    lk = Link(tmp_path)
    yield lk
    lk.close()


def test_a_restarted_client_signs_off_its_dead_session_and_is_taken_at_once(link, tmp_path):
    state = tmp_path / "state" / "supernode.json"
    state.parent.mkdir()
    # a: the client's first life; its node ID is remembered in the state file (a volume)
    a, log_a = link.node("a", state)
    node_id = re.search(r"SuperNode ID: (\d+)", _wait_for(log_a, r"SuperNode ID: \d+", a))[1]
    deadline = time.monotonic() + 10
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.exists(), "the node ID was not written to the state file"
    _kill_group(a)  # the container dies (OOM, power): its session is left online

    # control: the same restart with no remembered ID is refused while the session looks alive
    b, log_b = link.node("b", tmp_path / "state" / "empty.json")
    _wait_for(log_b, REFUSED, b)
    _kill_group(b)  # it never held the session: nothing stale is added

    # the restarted container (same state volume): signs off, and is taken at the first attempt
    c, log_c = link.node("c", state)
    text = _wait_for(log_c, r"SuperNode ID: \d+", c)
    assert SIGNED_OFF.search(text) and SIGNED_OFF.search(text)[1] == node_id, text[-2000:]
    assert REFUSED not in text, text[-2000:]
    assert re.search(r"SuperNode ID: (\d+)", text)[1] == node_id

    # a crash of the SuperNode alone (the entry point lives): signed off from memory, back at once
    (child,) = [
        p
        for p in psutil.Process(c.pid).children()
        if any(x.endswith("flower-supernode") for x in p.cmdline()[:2])
    ]
    child.kill()
    text = _wait_for(log_c, r"(?s)exited \(-9\).*SuperNode ID: \d+", c)
    after = text[text.index("exited (-9)") :]
    assert SIGNED_OFF.search(after), after[-2000:]
    assert REFUSED not in after, after[-2000:]  # no refusal after the kill itself

    # a stop is a stop: SIGTERM reaches the SuperNode, which signs off, and the entry point ends 0
    c.send_signal(signal.SIGTERM)
    assert c.wait(timeout=60) == 0
    link_log = (tmp_path / "logs" / "superlink.log").read_text()
    assert f"Deactivated node_id={node_id}" in link_log


def test_an_unregistered_key_is_refused_for_good_with_max_retries(link, tmp_path):
    """Flower's own ``--max-retries`` bounds the restarts: an intruder's container ends."""
    from deploy.certs import make_node_keys

    keys = make_node_keys(tmp_path / "intruder", ["intruder"])
    key = str(keys["intruder"].private)
    auth = ["--root-certificates", str(link.security.root_ca),
            "--auth-supernode-private-key", key, "--max-retries", "1"]  # fmt: skip
    proc, log = link.node("intruder", tmp_path / "intruder.json", *auth)
    assert proc.wait(timeout=120) != 0, log.read_text()[-2000:]
    text = log.read_text()
    assert text.count("flower-supernode exited") == 2 and "giving up" in text, text[-2000:]
    assert "SuperNode ID" not in text


def test_the_entry_point_starts_a_spare_worker_only_for_a_warm_worker_node(monkeypatch):
    from deploy.supernode import Spare, _warm_worker

    on = ["--node-config", 'partition-id=0 data-path="/data/a b.yaml" warm-worker=true']
    assert _warm_worker(on)
    assert _warm_worker(["--node-config=warm-worker=1 partition-id=3"])
    assert _warm_worker(["--node-config", 'warm-worker="TRUE"'])  # as the ClientApp reads it
    assert not _warm_worker(["--node-config", "Warm-Worker=true"])  # a key it does not read
    assert not _warm_worker(["--node-config", "partition-id=0 warm-worker=false"])
    assert not _warm_worker(["--node-config", "partition-id=0 my-warm-worker=true"])
    assert not _warm_worker(["--node-config", 'partition-id="unclosed warm-worker=true'])
    assert not _warm_worker(["--insecure"])
    monkeypatch.setenv("FEDYOLO_WORKER_PRESTART", "0")
    assert Spare(on).ready() is None  # turned off: the node starts its own worker


def test_a_spare_its_ended_supernode_adopted_is_ended_before_the_next_one_starts(
    monkeypatch, tmp_path
):
    """The SuperNode that adopted the spare crashed: the spare (its worker now, but not in its
    process group) is ended with it, as its own worker would be, and a new spare is started."""
    import subprocess
    import sys

    from deploy import supernode
    from fl_client import spare as spare_mod

    started = []

    def fake_start_spare():
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return started[-1], {spare_mod.SPARE_ENV: str(tmp_path / "new.sock")}

    monkeypatch.setattr(spare_mod, "start_spare", fake_start_spare)
    monkeypatch.delenv("FEDYOLO_WORKER_PRESTART", raising=False)
    s = supernode.Spare(["--node-config", "warm-worker=true"])
    waiting = s.ready()  # a spare waiting for its node: kept at the next start
    (tmp_path / "new.sock").touch()
    assert s.ready() == waiting and len(started) == 1
    (tmp_path / "new.sock").unlink()  # adopted: renamed to the node's socket
    adopted = started[0]
    s.ready()
    try:
        assert adopted.poll() is not None and len(started) == 2 and started[1].poll() is None
    finally:
        for p in started:
            p.kill()
            p.wait()
