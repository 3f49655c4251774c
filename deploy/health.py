"""Container health check: ``python3 -m deploy.health HOST:PORT`` exits 0 if something accepts
a TCP connection there within 3 s, else 1 with one line naming the address.

The images' ``HEALTHCHECK`` uses it (the SuperLink's API port, a SuperNode's Runtime API port):
standard library only, so it costs no import of torch or Flower.
"""

from __future__ import annotations

import socket
import sys


def healthy(address: str, timeout: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    addr = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
    if not healthy(addr):
        print(f"unhealthy: nothing accepts connections on {addr}", file=sys.stderr)
        sys.exit(1)
