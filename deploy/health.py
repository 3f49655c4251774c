"""Container health check: ``python3 -m deploy.health HOST:PORT [--tls HOST:PORT --ca FILE]``,
or ``python3 -m deploy.health --supernode``.

Exits 0 if something accepts a TCP connection on ``HOST:PORT`` within 3 s and, with ``--tls``,
a TLS handshake with the SuperLink at that address verifies against the CA certificate ``--ca``
(its certificate names that host); else 1 with one line naming what failed.

``--supernode`` (the client image's ``HEALTHCHECK``, so also ``docker run`` on a robot, the EC2
boot path and docker-compose.yml) reads both from the running ``flower-supernode``'s own
command line (``/proc/<pid>/cmdline``): its Runtime API (``--host``/``--port``, 127.0.0.1:9094
by default in Flower 1.41) and its SuperLink (``--superlink``, verified with
``--root-certificates``; with ``--insecure`` a TCP connection). Healthy = the SuperNode is up
*and* its link to the SuperLink works (the network, the name, TLS with the fleet's CA). It
does not prove the SuperLink accepted the node's key: a SuperNode the SuperLink refuses (an
unregistered key, a heartbeat answered "unauthorized") exits in Flower 1.41, and the
container's loop starts it again, so a check can fall in such a window; three failed checks
in a row make the container unhealthy. The server image's check is the first form. Standard
library only: it costs no import of torch or Flower.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

SUPERNODE = "flower-supernode"
RUNTIME_HOST, RUNTIME_PORT = "127.0.0.1", "9094"  # flower-supernode 1.41's --host, --port


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def healthy(address: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(_split(address), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def tls_link(address: str, ca: str, timeout: float = 3.0) -> str | None:
    """None if a TLS handshake with ``address`` verifies against ``ca``; else why not."""
    try:
        host, port = _split(address)
        context = ssl.create_default_context(cafile=ca)
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return None
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        return f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class SupernodeArgs:
    clientappio: str
    superlink: str | None
    root_ca: str | None
    insecure: bool


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def supernode_args(argv: list[str]) -> SupernodeArgs | None:
    """What a health check needs from a process's argv, or None when it is no SuperNode (the
    script itself, ``python3 .../flower-supernode ...``; not a shell that starts one)."""
    if not any(Path(a).name == SUPERNODE for a in argv[:2]):
        return None
    host = _option(argv, "--host") or RUNTIME_HOST
    port = _option(argv, "--port") or RUNTIME_PORT
    local = "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::") else host
    return SupernodeArgs(
        clientappio=f"{local}:{port}",
        superlink=_option(argv, "--superlink"),
        root_ca=_option(argv, "--root-certificates"),
        insecure="--insecure" in argv,
    )


def running_supernode(proc: Path = Path("/proc")) -> SupernodeArgs | None:
    """The first running ``flower-supernode`` process's arguments (by pid)."""
    pids = sorted((int(p.name) for p in proc.iterdir() if p.name.isdigit()), key=int)
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        found = supernode_args([a.decode(errors="replace") for a in raw.split(b"\0") if a])
        if found:
            return found
    return None


def check_supernode(proc: Path = Path("/proc")) -> str | None:
    """None when this container's SuperNode is up and linked to its SuperLink; else why not."""
    sn = running_supernode(proc)
    if sn is None:
        return "no flower-supernode process runs"
    if not healthy(sn.clientappio):
        return f"the SuperNode's Runtime API does not answer on {sn.clientappio}"
    if not sn.superlink:
        return "the SuperNode's command line names no --superlink"
    if sn.insecure or not sn.root_ca:
        return None if healthy(sn.superlink) else f"no link to the SuperLink at {sn.superlink}"
    why = tls_link(sn.superlink, sn.root_ca)
    return f"no TLS link to the SuperLink at {sn.superlink}: {why}" if why else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m deploy.health")
    p.add_argument("address", nargs="?", default="127.0.0.1:9092")
    p.add_argument("--tls", help="HOST:PORT of the SuperLink whose TLS link must verify")
    p.add_argument("--ca", help="the CA certificate for --tls")
    p.add_argument(
        "--supernode",
        action="store_true",
        help="check the running flower-supernode and its SuperLink, from its command line",
    )
    args = p.parse_args(argv)
    if args.supernode:
        why = check_supernode()
        if why:
            print(f"unhealthy: {why}", file=sys.stderr)
            return 1
        return 0
    if not healthy(args.address):
        print(f"unhealthy: nothing accepts connections on {args.address}", file=sys.stderr)
        return 1
    if args.tls:
        why = tls_link(args.tls, args.ca or "")
        if why:
            print(f"unhealthy: no TLS link to the SuperLink at {args.tls}: {why}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
