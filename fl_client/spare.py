"""Where a node's warm worker listens, and how its spare is started: the standard library only,
so the client image's entry point (``deploy.supernode``, the container's PID 1 for its whole
life) starts a node's spare without loading Flower (about 50 MB and 0.5 s). The worker itself,
its protocol and its callers: ``fl_client.worker``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

LOGGER = logging.getLogger("fedyolo.worker")
SPARE_ENV = "FEDYOLO_WORKER_SPARE"  # the node's spare worker's socket (start_spare)
PRESTART_ENV = "FEDYOLO_WORKER_PRESTART"  # 0: a node's starter starts no spare


def worker_dir(env: Mapping[str, str] | None = None) -> Path:
    """This user's folder of worker sockets (mode 0700), under ``FEDYOLO_WORKER_DIR`` (of
    ``env``, this process's environment by default) or the temporary folder; refused when
    another user owns it or can write to it."""
    env = os.environ if env is None else env
    base = Path(env.get("FEDYOLO_WORKER_DIR") or tempfile.gettempdir())
    folder = base / f"fedyolo-worker-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"warm worker folder '{folder}' must belong to uid {os.getuid()} with mode 0700"
        )
    return folder


PROTOCOL = 2  # in the socket's name: a caller never talks to a worker of another protocol
ACK = b"\x06"  # the worker took the connection (protocol 2)


def socket_path(watch_pid: int, node_id: int) -> Path:
    """The socket of the worker serving node ``node_id`` under the SuperExec ``watch_pid``."""
    return worker_dir() / f"{watch_pid}-{node_id}.v{PROTOCOL}.sock"


NODE_SOCKET = re.compile(rf"\d+-\d+\.v{PROTOCOL}\.sock")


def prestart(env: Mapping[str, str]) -> bool:
    """Whether a node's starter starts its spare worker (not with ``PRESTART_ENV=0``)."""
    return env.get(PRESTART_ENV, "1").lower() not in ("0", "false", "no")


@dataclasses.dataclass
class SpareSpec:
    """A node's spare worker, ready to start (:func:`spare_command`)."""

    cmd: list[str]  # python -m fl_client.worker ... --spare-fd N
    env: dict[str, str]  # its environment
    node_env: dict[str, str]  # the node's SuperNode's: SPARE_ENV names the spare's socket
    listener: socket.socket  # bound and listening already: pass it (pass_fds), then close it

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.listener.fileno(),)


def spare_command(
    watch: int | None = None, env: Mapping[str, str] | None = None, node: str = ""
) -> SpareSpec:
    """A node's spare worker, to start ahead of its first message, living for ``watch`` (by
    default this process, the node's starter); ``env``: the node's environment (this
    process's by default); ``node``: a label for its command line (``ps``, monitors). Its
    socket is bound and listening before this returns, so a first message that arrives before
    the spare has even started waits for it."""
    watch = os.getpid() if watch is None else watch
    env = dict(os.environ if env is None else env)
    listener, path = _bind_spare(worker_dir(env))
    listener.listen(8)
    extra = ["--spare-fd", str(listener.fileno()), *(["--node", node] if node else [])]
    cmd, spare_env = worker_command(path, watch, env, *extra)
    return SpareSpec(cmd, spare_env, {**env, SPARE_ENV: str(path)}, listener)


def _bind_spare(folder: Path) -> tuple[socket.socket, Path]:
    """A new socket for a spare in ``folder`` (the one the node's processes look in), bound to a
    name no other starter uses: starters in containers that share a ``FEDYOLO_WORKER_DIR``
    volume can have the same pid, so the name is random, and an existing name is never removed
    (it may be another node's live spare). Short: a socket's path is 108 bytes at most."""
    while True:
        path = folder / f"s{secrets.token_hex(5)}.v{PROTOCOL}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
        except OSError as e:
            listener.close()
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        return listener, path


def start_spare(watch: int | None = None) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start a node's spare worker now (:func:`spare_command`): its process, and the
    environment for the node's SuperNode."""
    spec = spare_command(watch)
    with spec.listener:
        proc = subprocess.Popen(  # noqa: S603 - this interpreter, this module
            spec.cmd, stdin=subprocess.DEVNULL, pass_fds=spec.fds, env=spec.env
        )
    LOGGER.info("started a spare warm worker (pid %d) at %s", proc.pid, spec.node_env[SPARE_ENV])
    return proc, spec.node_env


def worker_command(
    path: Path, watch: int, env: Mapping[str, str], *extra: str
) -> tuple[list[str], dict[str, str]]:
    """``python -m fl_client.worker`` at ``path`` for ``watch`` and its environment, with
    this caller's fl_client (Flower may have loaded it from the app's FAB)."""
    here = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "fl_client.worker", str(path), "--watch-pid", str(watch)]
    return [*cmd, *extra], {**env, "PYTHONPATH": pythonpath}
