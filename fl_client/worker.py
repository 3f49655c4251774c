"""The warm worker: one long-lived process per SuperNode that does its ClientApp's work.

Why: Flower 1.41's deployment runtime starts a new ``flwr-clientapp`` process for every message
(its SuperExec launches one per task; the "warm executor pools" it has are pre-started
Kubernetes pods, and they too start a process per task). Each such process would import torch
and Ultralytics (~3 s) and rebuild the model, trainer and data pipeline (~2-3.5 s), every round.
With node config ``warm-worker=true`` the per-message ClientApp, which imports only Flower and
numpy, hands the message's content, its node config and its state to this node's worker, which
keeps all of that loaded, and replies with what the worker answers. Flower still does everything
else: transport, TLS, node authentication, heartbeats, the node's ``context.state``.

Protocol: a Unix socket in a folder only this user can enter, one request per connection; every
frame is an 8-byte big-endian length and bytes. Request: a JSON header (kind, node config, the
caller's code digest), then the message content and the client's state as Flower's own protobuf
``RecordDict``. Reply: a JSON header (``ok``, or the error), then the reply content and the
updated state. Nothing is unpickled.

A bad caller (a bug, a stray process of this user: no one else can enter the socket folder)
cannot take the worker down. A header frame is at most ``HEADER_MAX`` (1 MiB); a content or
state frame at most ``FEDYOLO_WORKER_MAX_FRAME`` bytes (:func:`frame_max`, 1 GiB by default: the
worker learns its model only from the messages, so the bound is the largest model expected, not
this one). A longer frame is refused before a byte of it is read. A connection that stays silent
for ``FEDYOLO_WORKER_READ_TIMEOUT`` seconds (default 60; a genuine caller sends its message at
once, from memory) is closed, so the callers queued behind it are served. A malformed header or
record is answered with an error reply (``ok: false``) and the worker serves the next caller.

Lifetime: a node's first message starts its worker (under a lock file), or adopts the node's
*spare*: a worker its starter (the client image's entry point ``deploy.supernode``, the local
deployment's launcher) started with the node (``fl_client.spare``), warm before the first
message arrives. Its socket path is in ``FEDYOLO_WORKER_SPARE``, which the SuperNode's processes
inherit; the caller asks it to adopt the node's socket path and SuperExec, and it renames its
listening socket there (no second process, nothing reloaded). A spare lives as long as its
starter, without an idle limit; one that is gone, busy warming past ``START_TIMEOUT``, or of
other code is passed over and a worker is started as before. The worker lives as long
as the node's SuperExec (the ``flwr-clientapp`` processes' parent, which Flower ties to its
SuperNode) and exits within a second of it, or after ``FEDYOLO_WORKER_IDLE`` seconds without
work (default 1800). A worker whose code differs from its caller's (an upgrade) retires and a
fresh one starts. A worker that dies mid-message fails that message only (the round goes on
without this client, as with any client failure); the next message starts a new one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from flwr.app import Context, RecordDict

from fl_client.flower_adapter import recorddict_from_bytes as _records_from_bytes
from fl_client.flower_adapter import recorddict_to_bytes as _records_to_bytes
from fl_client.handlers import STATE_KEY, handle
from fl_client.lazy import lazy
from fl_client.spare import (
    ACK,
    NODE_SOCKET,
    SPARE_ENV,
    socket_path,
    worker_command,
)

torch = lazy("torch")

LOGGER = logging.getLogger("fedyolo.worker")

START_TIMEOUT = 300.0  # seconds for a new worker to import torch and Ultralytics and listen
_LEN = struct.Struct("!Q")
HEADER_MAX = 1 << 20  # a JSON header: the kind, a node config, a digest
# The float32 weights of the largest Ultralytics detector (YOLOv8x, 68 M parameters: 273 MB)
# about four times: the global model, a distillation teacher as large, and room to spare.
DEFAULT_FRAME_MAX = 1 << 30
DEFAULT_READ_TIMEOUT = 60.0


class WorkerError(RuntimeError):
    """The work failed in the worker; the message is already named (``ValueError: ...``)."""

    named = True


# -- where a node's worker listens -----------------------------------------------------------


@functools.cache
def code_digest() -> str:
    """sha256 of the client package's source: a worker only serves callers of the same code."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# -- frames ----------------------------------------------------------------------------------


class MalformedRequest(ValueError):
    """A request the worker cannot take (a frame too long, a header or record that does not
    parse): answered with an error reply, never the end of the worker."""


def frame_max() -> int:
    """The longest content or state frame, in bytes (``FEDYOLO_WORKER_MAX_FRAME``)."""
    return int(os.environ.get("FEDYOLO_WORKER_MAX_FRAME") or DEFAULT_FRAME_MAX)


def _read_timeout() -> float:
    return float(os.environ.get("FEDYOLO_WORKER_READ_TIMEOUT") or DEFAULT_READ_TIMEOUT)


def _send(f, data: bytes) -> None:
    f.write(_LEN.pack(len(data)))
    f.write(data)


def _recv(f, limit: int | None = None) -> bytes:
    """One frame of at most ``limit`` bytes (:func:`frame_max` by default); a longer one is
    refused (:class:`MalformedRequest`) before any of it is read."""
    head = f.read(_LEN.size)
    if len(head) < _LEN.size:
        raise ConnectionError("connection closed")
    (n,) = _LEN.unpack(head)
    limit = frame_max() if limit is None else limit
    if n > limit:
        raise MalformedRequest(f"a frame of {n} bytes, more than the {limit} allowed")
    data = f.read(n)
    if len(data) < n:
        raise ConnectionError("connection closed mid-frame")
    return data


# -- the caller's side (the per-message ClientApp) -------------------------------------------


def call(kind: str, content: RecordDict, context: Context, watch: int | None = None) -> RecordDict:
    """Have this node's warm worker do ``kind`` (``train`` or ``evaluate``) on ``content``;
    the worker is started when none answers. Updates the client's own entry of
    ``context.state`` and returns the reply content.

    ``watch``: the process the worker lives for; by default this process's parent, the
    SuperExec that started this ``flwr-clientapp`` process.
    """
    watch = os.getppid() if watch is None else watch
    path = socket_path(watch, int(context.node_id))
    state = RecordDict()
    if STATE_KEY in context.state:
        state[STATE_KEY] = context.state[STATE_KEY]
    header = {"kind": kind, "node": dict(context.node_config), "code": code_digest()}
    for _ in range(2):  # a second time after a stale worker retired
        conn = _connect_or_start(path, watch)
        try:  # a worker that dies while the message is still being sent breaks the pipe
            with conn, conn.makefile("rwb") as f:
                _send(f, json.dumps(header).encode())
                _send(f, _records_to_bytes(content))
                _send(f, _records_to_bytes(state))
                f.flush()
                reply = json.loads(_recv(f, HEADER_MAX))
                if reply.get("stale"):
                    continue
                out, new_state = _records_from_bytes(_recv(f)), _records_from_bytes(_recv(f))
        except ConnectionError as e:
            raise ConnectionError(
                f"the warm worker at '{path}' ended mid-message ({e}); its node's log has why"
            ) from e
        if not reply.get("ok"):
            raise WorkerError(str(reply.get("error", "unknown error")))
        if STATE_KEY in new_state:
            context.state[STATE_KEY] = new_state[STATE_KEY]
        return out
    raise RuntimeError(f"the warm worker at '{path}' kept retiring as stale")


def _connect(path: Path) -> socket.socket:
    """A connection the worker has taken: it sends ``ACK`` when it accepts. A worker that is
    dying may still have its listening socket for a moment: a connection queued there is reset
    before it is taken, and that is a worker that is not there (one is started), never a
    message lost half-way. Waits while a live worker finishes another message."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        if conn.recv(1) != ACK:
            raise ConnectionRefusedError(f"the warm worker at '{path}' closed before taking it")
    except OSError:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _adopt(spare: Path, path: Path, watch: int) -> bool:
    """Ask the node's spare worker to serve ``path`` for ``watch`` from now on; False when
    there is none to adopt (gone, already adopted, of other code, failed). Waits while the
    spare is still warming up (it listens from its start and takes connections once warm)."""
    header = {"kind": ADOPT, "path": str(path), "watch": watch, "code": code_digest()}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(START_TIMEOUT)
            conn.connect(str(spare))
            if conn.recv(1) != ACK:
                return False
            with conn.makefile("rwb") as f:
                for frame in (json.dumps(header).encode(), b"", b""):
                    _send(f, frame)
                f.flush()
                reply = json.loads(_recv(f, HEADER_MAX))
    except (OSError, ValueError) as e:
        LOGGER.info("no spare worker to adopt at %s (%s)", spare, e)
        return False
    if not isinstance(reply, dict) or not reply.get("ok"):
        LOGGER.info("the spare worker at %s was not adopted: %s", spare, reply)
        return False
    LOGGER.info("adopted the node's spare worker at %s", spare)
    return True


def _connect_or_start(path: Path, watch: int) -> socket.socket:
    with contextlib.suppress(OSError):
        return _connect(path)
    with _locked(path):
        with contextlib.suppress(OSError):
            return _connect(path)  # another message's process started it meanwhile
        path.unlink(missing_ok=True)
        spare = os.environ.get(SPARE_ENV)
        if spare and _adopt(Path(spare), path, watch):
            try:
                return _connect(path)
            except OSError as e:
                # the spare answered that it serves ``path`` now: a second worker here would
                # unlink its socket and leave it idle, so this message fails instead
                raise RuntimeError(
                    f"the node's spare worker took '{path}' but its first connection failed "
                    f"({e}); its node's log has why"
                ) from e
        LOGGER.info("starting the warm worker at %s", path)
        cmd, env = worker_command(path, watch, os.environ)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True, env=env)  # noqa: S603
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                return _connect(path)
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the warm worker exited with code {proc.returncode} before it listened "
                    f"at '{path}'; its node's log has why"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(
                    f"the warm worker did not listen at '{path}' within {START_TIMEOUT:.0f} s"
                )
            time.sleep(0.05)


# -- the worker's side -----------------------------------------------------------------------


def _warm_up() -> None:
    """Import and build once what every message needs."""
    from fl_client import evaluate, model, train  # noqa: F401
    from fl_client.ultralytics_adapter import local_trainer_class

    local_trainer_class()
    # torch imports its compiler stack inside the first optimiser's constructor (~2 s)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


class _Watched:
    """The process this worker lives for; pid reuse is told apart by its start time."""

    def __init__(self, pid: int):
        import psutil

        self.pid = pid
        try:
            self.created = psutil.Process(pid).create_time()
        except psutil.Error:
            self.created = None

    def alive(self) -> bool:
        import psutil

        try:
            return psutil.Process(self.pid).create_time() == self.created
        except psutil.Error:
            return False


ADOPT = "adopt"  # a request's kind: a spare worker takes on a node (_adopt)


class _Post:
    """Where this worker listens and whom it lives for; a spare until adopted."""

    def __init__(self, path: Path, watched: _Watched, spare: bool):
        self.path, self.watched, self.spare = path, watched, spare

    def adopt(self, header: Mapping) -> None:
        """Take on the node in ``header``: rename the listening socket to its path (a node
        socket in this worker's folder) and live for its SuperExec. ValueError names why not."""
        if not self.spare:
            raise ValueError("this worker already serves a node (not a spare)")
        path, watch = Path(str(header.get("path", ""))), header.get("watch")
        if path.parent != self.path.parent or not NODE_SOCKET.fullmatch(path.name):
            raise ValueError(f"'{path}' is not a node socket of this worker's folder")
        if path.exists():  # a caller removes a dead worker's socket first: this one may live
            raise ValueError(f"'{path}' exists: another worker's socket")
        if not isinstance(watch, int) or isinstance(watch, bool) or watch <= 0:
            raise ValueError(f"watch is {watch!r}, not a process id")
        watched = _Watched(watch)
        if not watched.alive():
            raise ValueError(f"process {watch} does not run")
        os.replace(self.path, path)  # the same listening socket, reached at the node's path
        LOGGER.info("spare worker %d adopted: %s for SuperExec %d", os.getpid(), path, watch)
        self.path, self.watched, self.spare = path, watched, False


def serve(path: Path, watch_pid: int, idle: float, spare_fd: int | None = None) -> None:
    """Answer requests at ``path`` until ``watch_pid`` ends, ``idle`` seconds pass without
    one, or a caller of other code retires this worker. A spare (``spare_fd``: the socket its
    starter bound at ``path``) has no idle limit and takes on a node when asked
    (:func:`_adopt`); a caller that comes while it warms up waits for it."""
    spare = spare_fd is not None
    me = _Post(path, _Watched(watch_pid), spare)
    if spare:
        os.set_inheritable(spare_fd, False)  # never carried into a process this one starts
    srv = socket.socket(fileno=spare_fd) if spare else socket.socket(socket.AF_UNIX)
    mine = None  # the socket file this worker listens at (its inode): what it removes at exit
    try:
        if spare:
            mine = os.stat(path).st_ino
        _warm_up()
        if not spare:
            # no unlink first: its caller removed a dead worker's socket under the node's lock,
            # so one here now is a live worker's (EADDRINUSE: this one ends, that one serves)
            srv.bind(str(path))
            mine = os.stat(path).st_ino
            srv.listen(8)
        srv.settimeout(1.0)
        LOGGER.info(
            "warm worker %d listening at %s for %s %d",
            os.getpid(),
            path,
            "its starter, as a spare," if spare else "SuperExec",
            watch_pid,
        )
        last = time.monotonic()
        while me.watched.alive() and (me.spare or time.monotonic() - last < idle):
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.settimeout(_read_timeout())  # a silent caller is closed, the next one served
            with conn, conn.makefile("rwb") as f:
                try:
                    conn.sendall(ACK)  # taken: from here a failure is this message's own
                    retire = _answer(f, handle, me.adopt)
                except OSError as e:  # the caller went away (killed) or fell silent
                    LOGGER.warning("warm worker: a caller left or fell silent mid-message (%s)", e)
                    retire = False
            last = time.monotonic()
            if retire:
                LOGGER.info(
                    "warm worker %d retires: a caller runs other code (an upgrade)", os.getpid()
                )
                break
    finally:
        with contextlib.suppress(OSError):  # gone already, or another worker's by now
            if mine is not None and os.stat(me.path).st_ino == mine:
                me.path.unlink()
        srv.close()


def _answer(f, handle, adopt=None) -> bool:
    """One request; True when this worker must retire (the caller's code differs).
    ``adopt``: what takes an ``adopt`` request (a spare's :meth:`_Post.adopt`)."""
    try:
        header, content, state = _request(f)
    except MalformedRequest as e:
        LOGGER.warning("warm worker: refused a malformed request: %s", e)
        _reply(f, {"ok": False, "error": f"MalformedRequest: {e}"}, RecordDict(), RecordDict())
        return False
    if header.get("code") != code_digest():
        _send(f, json.dumps({"ok": False, "stale": True}).encode())
        f.flush()
        return True
    if header.get("kind") == ADOPT:
        try:
            if adopt is None:
                raise ValueError("this worker takes no adopt request")
            adopt(header)
            reply = {"ok": True}
        except (OSError, ValueError) as e:
            LOGGER.warning("warm worker: refused to adopt: %s", e)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        _reply(f, reply, RecordDict(), RecordDict())
        return False
    node: Mapping = header.get("node", {})
    try:
        out, reply = handle(str(header["kind"]), content, node, state), {"ok": True}
    except Exception as e:  # noqa: BLE001 - every failure goes back to the caller, named
        LOGGER.warning("warm worker: %s failed: %s: %s", header.get("kind"), type(e).__name__, e)
        out, reply = RecordDict(), {"ok": False, "error": f"{type(e).__name__}: {e}"}
    _reply(f, reply, out, state)
    return False


def _request(f) -> tuple[dict, RecordDict, RecordDict]:
    """The three frames of a request, parsed; :class:`MalformedRequest` names what is wrong.
    A frame over its limit ends the request there (the rest of the connection is not read)."""
    head, content, state = _recv(f, HEADER_MAX), _recv(f), _recv(f)
    try:
        header = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedRequest(f"the header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise MalformedRequest(f"the header is a JSON {type(header).__name__}, not an object")
    try:
        return header, _records_from_bytes(content), _records_from_bytes(state)
    except Exception as e:  # noqa: BLE001 - protobuf and Flower's decoding name hostile bytes
        raise MalformedRequest(f"a record is not a RecordDict ({type(e).__name__}: {e})") from e


def _reply(f, reply: dict, out: RecordDict, state: RecordDict) -> None:
    _send(f, json.dumps(reply).encode())
    _send(f, _records_to_bytes(out))
    _send(f, _records_to_bytes(state))
    f.flush()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fl_client.worker", description=__doc__)
    ap.add_argument("socket", type=Path)
    ap.add_argument("--watch-pid", type=int, required=True)
    ap.add_argument("--spare-fd", type=int, help="a node's spare, on this socket (fl_client.spare)")
    ap.add_argument("--node", default="", help="a spare's node, as its starter names it (ps)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[fedyolo worker] %(levelname)s %(message)s")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through serve's clean-up
    idle = float(os.environ.get("FEDYOLO_WORKER_IDLE", "1800"))
    serve(args.socket, args.watch_pid, idle, spare_fd=args.spare_fd)


if __name__ == "__main__":
    main()
