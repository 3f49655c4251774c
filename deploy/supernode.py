"""The client image's entry point: ``python3 -m deploy.supernode <flower-supernode arguments>``.

Runs ``flower-supernode`` with the arguments as given, and when it exits other than cleanly
(a crash, a SuperLink that refused it) starts it again after 2 s. What it adds to a plain restart
loop is the *sign-off of the dead session*: in Flower 1.41 a SuperNode that dies without signing
off stays "online" on the SuperLink until it has missed two heartbeats (30 s each, fixed), and
the SuperLink refuses its key until then (``ActivateNode``: 412), so a restarted client sat out
40-60 s, several rounds. Before each start this process sends the SuperLink the
``DeactivateNode`` a clean SuperNode sends on SIGTERM, for the node ID that *this container's*
previous SuperNode was given (``SuperNode ID: N`` in its log), signed with the node's own key
(Flower's node authentication lets a key sign off only its own node). The new SuperNode is then
taken at once.

The node ID is kept in memory (a crashed ``flower-supernode`` child) and in
``$FEDYOLO_NODE_STATE`` (default ``/state/supernode.json``, with the key's fingerprint), so a
restarted *container* signs off too when ``/state`` is a volume (docker-compose.yml and the EC2
user data mount one per client); on a read-only or absent ``/state`` only the in-memory part
works and a restarted container waits for the SuperLink as before. A container that never held
the session (a second container given the same key by mistake) has no ID and signs off nothing:
it cannot take over a live node.

With ``warm-worker=true`` in ``--node-config`` this process also starts the node's *spare* warm
worker before each ``flower-supernode`` (``fl_client.spare.start_spare``; unless
``FEDYOLO_WORKER_PRESTART=0``), so torch, Ultralytics and the trainer are loaded while the node
connects and waits: its first message adopts that worker instead of starting one (about 4-6 s of
a 2-core CPU's cold start). A spare already adopted is replaced at the next restart.

SIGTERM and SIGINT go to ``flower-supernode`` (which signs off itself) and end this process with
0: a ``docker stop`` is a stop, not a crash. flower-supernode's exit code 0 ends the loop; with
``--max-retries N`` (Flower's bound on reconnecting) the loop ends after N restarts too, with
flower-supernode's exit code (an unregistered key is then refused for good, not retried forever).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

SUPERNODE = "flower-supernode"
NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
RETRY_SECONDS = 2.0
STATE_ENV, STATE_DEFAULT = "FEDYOLO_NODE_STATE", "/state/supernode.json"


def _say(text: str) -> None:
    print(f"fedyolo: {text}", file=sys.stderr, flush=True)


def _option(args: list[str], name: str) -> str | None:
    """``--name value`` or ``--name=value`` from flower-supernode's arguments."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


class Session:
    """The node ID this container's SuperNode was given, and how to sign it off."""

    def __init__(self, args: list[str], state: Path):
        self.superlink = _option(args, "--superlink") or "127.0.0.1:9092"
        self.ca = _option(args, "--root-certificates")
        self.key_file = _option(args, "--auth-supernode-private-key")
        self.insecure = "--insecure" in args
        self.state = state
        self.node_id: int | None = None
        self._fingerprint = self._key_fingerprint()
        self._load()

    def _key_fingerprint(self) -> str | None:
        """sha256 of the node's public key: a remembered ID serves only the key it was for."""
        if not self.key_file:
            return None
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            PublicFormat,
            load_ssh_private_key,
        )

        try:
            private = load_ssh_private_key(Path(self.key_file).read_bytes(), None)
            public = private.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        except (OSError, ValueError, TypeError):
            return None  # flower-supernode says what is wrong with the key
        return hashlib.sha256(public).hexdigest()

    def _load(self) -> None:
        try:
            saved = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return
        if isinstance(saved, dict) and saved.get("key_sha256") == self._fingerprint:
            node_id = saved.get("node_id")
            self.node_id = node_id if isinstance(node_id, int) and node_id > 0 else None

    def remember(self, node_id: int) -> None:
        self.node_id = node_id
        try:
            tmp = self.state.with_suffix(".tmp")
            tmp.write_text(json.dumps({"node_id": node_id, "key_sha256": self._fingerprint}))
            tmp.replace(self.state)
        except OSError:
            pass  # no writable /state: the in-memory ID still serves a crashed child

    def sign_off(self) -> str:
        """``DeactivateNode`` for the remembered node, signed with its key; what happened."""
        if self.node_id is None:
            return "no earlier session of this container to sign off"
        if self.insecure or not self.key_file or self._fingerprint is None:
            return "no node key (node authentication off): nothing to sign off"
        try:
            self._deactivate(self.node_id)
        except Exception as e:  # noqa: BLE001 - any failure: the SuperLink's heartbeat rule
            return f"sign-off of node {self.node_id} not accepted ({type(e).__name__}: {e})"
        return f"signed off node {self.node_id}'s dead session"

    def _deactivate(self, node_id: int) -> None:
        from fl_client.flower_adapter import deactivate_node

        deactivate_node(self.superlink, self.ca, Path(self.key_file), node_id)


def _relay(stream, session: Session) -> None:
    """flower-supernode's output to ours, line by line; its node ID remembered."""
    for line in iter(stream.readline, b""):
        sys.stderr.buffer.write(line)
        sys.stderr.flush()
        if m := NODE_ID_LINE.search(line.decode(errors="replace")):
            session.remember(int(m.group(1)))


def _warm_worker(args: list[str]) -> bool:
    """Whether ``--node-config`` turns the warm worker on (``warm-worker=true``)."""
    try:
        items = shlex.split(_option(args, "--node-config") or "")
    except ValueError:
        return False  # flower-supernode says what is wrong with it
    pairs = (i.partition("=") for i in items)  # the value read as fl_client.client_app does
    return any(k == "warm-worker" and v.lower() in ("true", "1") for k, _, v in pairs)


class Spare:
    """The node's spare warm worker (``fl_client.spare.start_spare``), kept ready."""

    def __init__(self, args: list[str]):
        self.wanted = _warm_worker(args)
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] | None = None

    def ready(self) -> dict[str, str] | None:
        """The environment for the next ``flower-supernode``: a spare running and not yet
        adopted, or a new one (None: no spare, the node starts its worker itself)."""
        from fl_client.spare import SPARE_ENV, prestart, start_spare

        if not (self.wanted and prestart(os.environ)):
            return None

        alive = self.env and self.proc and self.proc.poll() is None
        if alive and Path(self.env[SPARE_ENV]).exists():
            return self.env  # still waiting for its node
        if alive:  # adopted by the SuperNode that ended: ended with it, as its own worker is
            self.proc.kill()
            self.proc.wait()
        try:
            self.proc, self.env = start_spare()
        except (OSError, RuntimeError) as e:  # e.g. a socket folder others can write to
            _say(f"no spare warm worker ({type(e).__name__}: {e}); the node starts its own")
            self.proc, self.env = None, None
        return self.env


def _end_group(pgid: int) -> None:
    with contextlib.suppress(OSError):  # nothing left
        os.killpg(pgid, signal.SIGKILL)


def main(args: list[str]) -> int:
    session = Session(args, Path(os.environ.get(STATE_ENV, STATE_DEFAULT)))
    stopping = threading.Event()
    child: subprocess.Popen | None = None

    def stop(signum, _frame) -> None:
        stopping.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if "--help" in args or "-h" in args:
        return subprocess.call([SUPERNODE, *args])
    # Flower's own bound on reconnecting, when given, bounds the restarts too (a SuperNode the
    # SuperLink keeps refusing then ends, as flower-supernode does); without it: no bound
    retries = _option(args, "--max-retries")
    limit = int(retries) if retries and retries.isdigit() else None
    failures = 0
    spare = Spare(args)
    while not stopping.is_set():
        if session.node_id is not None:  # an earlier SuperNode of this container's
            _say(session.sign_off())
        # its own process group: what a crashed SuperNode leaves (its SuperExec, the ClientApp
        # or warm worker) is ended with it, never left to talk to the next one
        child = subprocess.Popen(
            [SUPERNODE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=spare.ready(),
        )
        relay = threading.Thread(target=_relay, args=(child.stdout, session), daemon=True)
        relay.start()
        code = child.wait()
        _end_group(child.pid)
        relay.join(timeout=5)
        if code == 0 or stopping.is_set():
            return 0
        failures += 1
        if limit is not None and failures > limit:
            _say(f"flower-supernode exited ({code}) {failures} times; giving up (--max-retries)")
            return code if code > 0 else 1
        _say(f"flower-supernode exited ({code}); retrying in {RETRY_SECONDS:.0f} s")
        stopping.wait(RETRY_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
