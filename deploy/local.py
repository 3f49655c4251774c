"""Flower's deployment engine on one machine: a SuperLink and one SuperNode per client.

These are the same processes a real fleet runs (``flower-superlink``, ``flower-supernode``,
``flwr run``), on loopback. Each SuperNode gets its shard through its node config
(``partition-id``), exactly as a robot would get ``data-path``. Every process is started in its
own process group and the whole group is terminated on exit — normal end, error, Ctrl-C or
SIGTERM — so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.certs import NodeKeys, make_node_keys, make_tls
from fl_server.interrupts import StopFile, interrupts_to

LOGGER = logging.getLogger("fedyolo")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FEDERATION = "fedyolo-local"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} at start-up")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def _bin(name: str) -> str:
    """The console script from this interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once: no handler, no ``finally`` runs.

    What a power cut or the OOM killer does to a server; tests and the fault benchmark use it
    to check that a run resumes from what such a kill leaves behind.
    """
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)


class ProcessGroup:
    """Started processes, each in its own session, all stopped together."""

    def __init__(self, log_dir: Path, flwr_home: str = ""):
        self.log_dir = log_dir
        self.flwr_home = flwr_home
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=PROJECT_ROOT,
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every started process and all its descendants, then SIGKILL survivors.

        The SuperLink and SuperNodes start ``flwr-serverapp``/``flwr-clientapp`` in sessions of
        their own, so process groups are not enough: the whole tree is collected, plus any
        process that inherited this deployment's ``FLWR_HOME``.
        """
        import psutil

        tree: dict[int, psutil.Process] = {}
        for _, proc in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    tree[p.pid] = p
        for p in self._by_env(psutil):
            tree.setdefault(p.pid, p)
        for p in tree.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(list(tree.values()), timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        for _, proc in self.procs:  # reap our direct children
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)

    def _by_env(self, psutil) -> list:
        found = []
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if self.flwr_home and p.environ().get("FLWR_HOME") == self.flwr_home:
                    found.append(p)
        return found


STOP_GRACE = 60.0  # seconds the ServerApp gets to end the run `interrupted` before the kill


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_local_deployment(
    run_dir: Path,
    num_clients: int,
    *,
    host: str,
    port: int,
    startup_timeout: float,
    client_threads: int,
    insecure: bool,
    warm_worker: bool = True,
    fault_injection: bool = False,
) -> None:
    """Run the prepared run directory's federation on a local SuperLink + SuperNodes.

    The settings are ``configs/engine/local-deployment.yaml``'s (their one home); port 0 = free.
    """
    port = port or free_port(host)
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.chmod(flwr_home, 0o700)
    nodes = node_names(num_clients)
    security = make_security(
        flwr_home / "secrets", [host, "localhost", "127.0.0.1"], nodes, insecure
    )
    env = flwr_env(flwr_home, f"{host}:{port}", security)
    # Client processes get their thread budget; the SuperLink (and the ServerApp it starts,
    # which evaluates the global model while the clients wait) keeps the machine's default.
    client_env = {**env, **client_runtime_env(client_threads)}
    group = ProcessGroup(run_dir / "logs", flwr_home=str(flwr_home))
    stop = StopFile(run_dir / ".interrupt")
    stop.clear()  # left by an earlier interrupted run of this directory
    following = threading.Event()  # before `flwr run`, a Ctrl-C leaves at once
    with interrupts_to(stop, armed=following.is_set):
        try:
            link = group.start(
                "superlink",
                [
                    _bin("flower-superlink"),
                    *security.superlink,
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                ],
                env,
            )
            wait_for_port(host, port, startup_timeout, link)
            register_nodes(security, env)
            for i in range(num_clients):
                group.start(
                    nodes[i],
                    [
                        _bin("flower-supernode"),
                        *security.supernode(nodes[i]),
                        "--superlink",
                        f"{host}:{port}",
                        "--port",
                        str(free_port(host)),
                        "--node-config",
                        f"partition-id={i} num-partitions={num_clients} "
                        f"warm-worker={str(warm_worker).lower()} "
                        f"fault-injection={str(fault_injection).lower()}",
                    ],
                    client_env,
                )
            LOGGER.info(
                "deployment engine: SuperLink on %s:%d, %d SuperNodes (logs in %s)",
                host,
                port,
                num_clients,
                run_dir / "logs",
            )
            from fl_server.run_dir import read_jsonl

            before = len(read_jsonl(run_dir / "events.jsonl"))  # a resumed run has earlier ends
            runner = group.start("flwr-run", flwr_run_args(run_dir), env)
            following.set()
            follow(runner, run_dir, before, stop)
        finally:
            group.stop()


def node_names(num_clients: int) -> list[str]:
    return [f"supernode-{i}" for i in range(num_clients)]


def client_runtime_env(client_threads: int) -> dict[str, str]:
    """A SuperNode's environment beyond Flower's connection settings: its torch thread budget,
    and its SuperExec picking up each message's task every 0.1 s instead of Flower's default
    1 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; a poll of the node's own local API)."""
    return {"OMP_NUM_THREADS": str(client_threads), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def flwr_env(flwr_home: Path, address: str, security: Security) -> dict[str, str]:
    """The environment of this deployment's Flower processes and ``flwr`` CLI calls, whose
    ``FLWR_HOME/config.toml`` names the SuperLink at ``address`` (and the CA to trust)."""
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "{address}"\n{security.cli_toml}'
    )
    return {
        **os.environ,
        # Flower's processes start each other by name (flower-superexec, flwr-serverapp,
        # flwr-clientapp): this environment's scripts come first, activated or not.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "YOLO_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
        "PYTHONUNBUFFERED": "1",
    }


def register_nodes(security: Security, env: dict[str, str]) -> None:
    """Node authentication: only these SuperNodes' public keys may join the SuperLink."""
    for keys in security.node_keys.values():
        flwr_cli(["supernode", "register", str(keys.public), FEDERATION], env)


@dataclass(frozen=True)
class Security:
    """The TLS and node-authentication arguments of one deployment (or plaintext, if asked)."""

    superlink: list[str]
    cli_toml: str
    node_keys: dict[str, NodeKeys]
    root_ca: Path | None

    def supernode(self, name: str) -> list[str]:
        if self.root_ca is None:
            return ["--insecure"]
        return [
            "--root-certificates",
            str(self.root_ca),
            "--auth-supernode-private-key",
            str(self.node_keys[name].private),
        ]


def make_security(folder: Path, hosts: list[str], nodes: list[str], insecure: bool) -> Security:
    """TLS with a per-run CA whose SuperLink certificate covers ``hosts``, and SuperNode
    authentication with a key pair per node (``deploy.certs``); ``insecure`` only where the
    config asked for it (loopback only)."""
    if insecure:
        return Security(["--insecure"], "insecure = true\n", {}, None)
    tls = make_tls(folder, hosts)
    keys = make_node_keys(folder / "supernodes", nodes)
    return Security(
        superlink=[
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.cert),
            "--ssl-keyfile",
            str(tls.key),
            "--enable-supernode-auth",
        ],
        cli_toml=f"root-certificates = {json.dumps(str(tls.ca_cert))}\n",
        node_keys=keys,
        root_ca=tls.ca_cert,
    )


def flwr_run_args(run_dir: Path) -> list[str]:
    """``flwr run`` of this project on the deployment's SuperLink, for the prepared run."""
    return [
        _bin("flwr"),
        "run",
        str(PROJECT_ROOT),
        FEDERATION,
        "--run-config",
        # a TOML basic string (JSON's escaping is TOML's): no quote in a path can end the value
        # and add keys
        f"run-dir={json.dumps(str(run_dir))}",
        "--stream",
    ]


def flwr_cli(args: list[str], env: dict[str, str]) -> None:
    """One ``flwr`` CLI command against this deployment's SuperLink; raise with its output."""
    done = subprocess.run(
        [_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"flwr {' '.join(args[:2])} failed: {(done.stdout + done.stderr)[-800:]}"
        )


def engine(run, cfg) -> None:
    """The ``local-deployment`` engine (``fl_server.engines``): this machine's SuperLink and
    one SuperNode per client, with ``configs/engine/local-deployment.yaml``'s settings."""
    from fl_client import faults

    e = cfg.engine
    run_local_deployment(
        run.path,
        int(cfg.federation.clients),
        host=str(e.host),
        port=int(e.port),
        startup_timeout=float(e.startup_timeout),
        client_threads=int(e.client_threads),
        insecure=bool(e.insecure),
        warm_worker=bool(e.warm_worker),
        # this run's own SuperNodes act out the faults its config injects (fl_client.faults)
        fault_injection=bool(faults.parse(cfg.faults, int(cfg.federation.clients))),
    )


def follow(runner: subprocess.Popen, run_dir: Path, before: int, stop: StopFile) -> None:
    """Wait for ``flwr run`` to end: a ``run_end`` event after the first ``before`` events.

    After a Ctrl-C/SIGTERM the ServerApp ends the run ``interrupted`` and this raises
    ``KeyboardInterrupt`` (the CLI exits 130); a ServerApp that has not ended within
    ``STOP_GRACE`` seconds is killed with the rest.
    """
    import json

    from fl_server.hooks import STOP_STATUSES
    from fl_server.run_dir import read_jsonl

    summary = run_dir / "summary.json"
    asked_at = None
    while runner.poll() is None:
        if any(e["kind"] == "run_end" for e in read_jsonl(run_dir / "events.jsonl")[before:]):
            break
        if asked_at is None and stop.is_set():
            asked_at = time.monotonic()
        if asked_at is not None and time.monotonic() - asked_at > STOP_GRACE:
            LOGGER.warning("the ServerApp did not stop within %.0f s: killing it", STOP_GRACE)
            break
        time.sleep(0.5)
    if stop.is_set():
        raise KeyboardInterrupt
    status = json.loads(summary.read_text()).get("status") if summary.exists() else None
    if status not in ("completed", *STOP_STATUSES):  # stopped/pruned: by design (guard, hooks)
        raise RuntimeError(
            f"deployment run ended with status {status!r}; last lines of "
            f"{run_dir / 'logs' / 'flwr-run.log'}:\n{tail(run_dir / 'logs' / 'flwr-run.log')}"
        )
