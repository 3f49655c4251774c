"""``python3 -m deploy.health --supernode``, the client image's health check: "up and linked"
read from the running SuperNode's own command line. A fake ``/proc`` holds the command lines;
the ports are real listeners on 127.0.0.1, the TLS link a real handshake with a certificate of
``deploy.certs``."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

from deploy import health
from deploy.certs import make_tls


def _proc(tmp_path: Path, *argvs: list[str]) -> Path:
    proc = tmp_path / "proc"
    for pid, argv in enumerate(argvs, start=100):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (proc / "self").mkdir(parents=True)
    return proc


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_the_supernode_is_found_by_its_script_not_by_the_shell_that_loops_on_it():
    shell = ["/bin/sh", "-c", "while :; do flower-supernode \"$@\"; done", "flower-supernode",
             "--superlink=superlink:9092"]  # fmt: skip
    assert health.supernode_args(shell) is None
    sn = health.supernode_args(
        [
            "/opt/venv/bin/python3",
            "/opt/venv/bin/flower-supernode",
            "--superlink",
            "superlink:9092",
            "--root-certificates=/secrets/ca.crt",
        ]  # fmt: skip
    )
    assert sn == health.SupernodeArgs("127.0.0.1:9094", "superlink:9092", "/secrets/ca.crt", False)
    sn = health.supernode_args(
        ["flower-supernode", "--insecure", "--host", "0.0.0.0", "--port=9190"]
    )
    assert sn is not None and sn.clientappio == "127.0.0.1:9190" and sn.insecure


def test_healthy_only_when_up_and_linked(tmp_path):
    with _listener() as app, _listener() as link:
        app_port, link_port = app.getsockname()[1], link.getsockname()[1]
        argv = ["python3", "/v/bin/flower-supernode", "--insecure",
                "--host=0.0.0.0", f"--port={app_port}"]  # fmt: skip
        proc = _proc(
            tmp_path, ["/bin/sh", "-c", "loop"], [*argv, f"--superlink=127.0.0.1:{link_port}"]
        )
        assert health.check_supernode(proc) is None
        link.close()  # the SuperLink is gone: unhealthy, saying so
        assert health.check_supernode(proc) == f"no link to the SuperLink at 127.0.0.1:{link_port}"
        app.close()
        assert "does not answer on 127.0.0.1:" in health.check_supernode(proc)
    assert health.check_supernode(_proc(tmp_path / "empty")) == "no flower-supernode process runs"


def test_the_tls_link_must_verify_against_the_supernodes_ca(tmp_path):
    tls = make_tls(tmp_path / "tls", ["localhost"])
    other = make_tls(tmp_path / "other", ["localhost"])  # another fleet's CA
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert, tls.key)
    with _listener() as app, _listener() as server:
        port = server.getsockname()[1]

        def serve() -> None:
            for _ in range(2):
                conn, _ = server.accept()
                try:
                    with ctx.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        base = ["python3", "/v/bin/flower-supernode", f"--superlink=localhost:{port}",
                f"--port={app.getsockname()[1]}"]  # fmt: skip
        ok = _proc(tmp_path / "a", [*base, f"--root-certificates={tls.ca_cert}"])
        assert health.check_supernode(ok) is None
        bad = _proc(tmp_path / "b", [*base, f"--root-certificates={other.ca_cert}"])
        why = health.check_supernode(bad)
        assert why is not None and why.startswith(
            f"no TLS link to the SuperLink at localhost:{port}"
        )
        t.join(timeout=10)
