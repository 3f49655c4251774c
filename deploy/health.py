"""Container health check: ``python3 -m deploy.health HOST:PORT [--tls HOST:PORT --ca FILE]``.

Exits 0 if something accepts a TCP connection on ``HOST:PORT`` within 3 s and, with ``--tls``,
a TLS handshake with the SuperLink at that address verifies against the CA certificate ``--ca``
(its certificate names that host); else 1 with one line naming what failed.

The images' ``HEALTHCHECK`` uses the first form (the SuperLink's API port, a SuperNode's Runtime
API port). docker-compose.yml gives the SuperNodes the second: a client is healthy when its
SuperNode is up *and* its link to the SuperLink works (the network, the name, TLS with the run's
CA). A SuperNode that the SuperLink refuses (an unregistered key, a heartbeat answered
"unauthorized") exits in Flower 1.41, so "up and linked" means connected. Standard library
only: it costs no import of torch or Flower.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m deploy.health")
    p.add_argument("address", nargs="?", default="127.0.0.1:9092")
    p.add_argument("--tls", help="HOST:PORT of the SuperLink whose TLS link must verify")
    p.add_argument("--ca", help="the CA certificate for --tls")
    args = p.parse_args(argv)
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
