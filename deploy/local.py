"""Flower's deployment engine on one machine: a SuperLink and one SuperNode per client.

These are the same processes a real fleet runs (``flower-superlink``, ``flower-supernode``,
``flwr run``), on loopback. Each SuperNode gets its shard through its node config
(``partition-id``), exactly as a robot would get ``data-path``. Every process is started in its
own process group and the whole group is terminated on exit — normal end, error, Ctrl-C or
SIGTERM — so nothing is left behind.

**Other local users.** Flower 1.41's Control API has no accounts (whoever reaches the port can
list, start and stop runs; TLS does not help, a client may skip verification), and a
ClientApp's token is on its command line, readable by every user in ``/proc``. So the run's
Flower processes and the ``flwr`` calls that talk to them run in a private network namespace of
the run (``unshare -n`` as root, ``unshare -rn`` otherwise): one launcher process
(``python -m deploy.local SPEC``) starts them in there, and this process follows the run
through the run directory's files and the stop file, as before. Where no namespace can be made
the engine refuses in one line, unless the user accepts the exposure with
``engine.isolation=none``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from deploy import DeployError
from deploy.certs import NodeKeys, make_node_keys, make_tls
from fl_server.engines import STOP_STATUSES, EventKind, RunDir, Status, StopFile, interrupts_to

LOGGER = logging.getLogger("fedyolo")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FEDERATION = "fedyolo-local"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen | None = None
) -> None:
    """Wait until ``host:port`` accepts a connection; ``proc``: the process that should listen
    there (None: one this process did not start, e.g. an existing SuperLink)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
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

    def start(
        self, name: str, args: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()
    ) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=PROJECT_ROOT,
            pass_fds=pass_fds,
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
    isolation: str = "namespace",
) -> None:
    """Run the prepared run directory's federation on a local SuperLink + SuperNodes.

    The settings are ``configs/engine/local-deployment.yaml``'s (their one home); port 0 = free.
    With ``isolation="namespace"`` every Flower process of the run, and the ``flwr`` calls that
    talk to them, run in a private network namespace (:func:`namespace_command`); this process
    follows the run through the run directory's files, as it does without one.
    """
    prefix = isolation_prefix(isolation, host)
    port = port or free_port(host)
    run = RunDir(run_dir)
    flwr_home = run.flwr_home
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.chmod(flwr_home, 0o700)
    nodes = node_names(num_clients)
    security = make_security(
        flwr_home / "secrets", [host, "localhost", "127.0.0.1"], nodes, insecure
    )
    env = flwr_env(flwr_home, f"{host}:{port}", security)
    plan = Plan(
        run_dir=str(run_dir),
        host=host,
        port=port,
        nodes=nodes,
        startup_timeout=startup_timeout,
        client_threads=client_threads,
        warm_worker=warm_worker,
        fault_injection=fault_injection,
        superlink_args=security.superlink,
        supernode_args={n: security.supernode(n) for n in nodes},
        public_keys=[str(k.public) for k in security.node_keys.values()],
    )
    group = ProcessGroup(run.logs, flwr_home=str(flwr_home))
    stop = StopFile(run.interrupt)
    stop.clear()  # left by an earlier interrupted run of this directory
    following = threading.Event()  # before `flwr run`, a Ctrl-C leaves at once
    before = len(run.read_events())  # a resumed run has earlier ends
    with interrupts_to(stop, armed=following.is_set):
        try:
            if prefix:
                spec = flwr_home / "deployment.json"
                spec.write_text(json.dumps(dataclasses.asdict(plan)))
                runner = group.start(
                    LAUNCHER, [*prefix, sys.executable, "-m", "deploy.local", str(spec)], env
                )
                LOGGER.info(
                    "deployment engine: %d SuperNodes and a SuperLink on %s:%d in a private "
                    "network namespace (logs in %s)",
                    num_clients,
                    host,
                    port,
                    run.logs,
                )
                following.set()  # the launcher submits nothing once the stop file is there
            else:
                runner = start_federation(plan, group, env, stop)
                if runner is None:
                    raise KeyboardInterrupt
                following.set()
            try:
                follow(runner, run_dir, before, stop)
            except RuntimeError:
                if prefix and runner.poll() == LAUNCH_FAILED:
                    raise RuntimeError(
                        "the local deployment did not start: "
                        + tail(run.logs / f"{LAUNCHER}.log", 1)
                    ) from None
                raise
        finally:
            group.stop()


LAUNCHER = "deployment"  # its log: logs/deployment.log
LAUNCH_FAILED = 97  # the launcher's exit code when the federation did not start


@dataclass(frozen=True)
class Plan:
    """What the Flower processes of one local deployment are started with: paths and
    settings, no secret (it is handed to the launcher in the namespace as a file)."""

    run_dir: str
    host: str
    port: int
    nodes: list[str]
    startup_timeout: float
    client_threads: int
    warm_worker: bool
    fault_injection: bool
    superlink_args: list[str]
    supernode_args: dict[str, list[str]]
    public_keys: list[str]


def start_federation(
    plan: Plan, group: ProcessGroup, env: dict[str, str], stop: StopFile
) -> subprocess.Popen | None:
    """Start the SuperLink, register the SuperNodes' keys, start the SuperNodes and submit the
    run with ``flwr run``; returns that ``flwr run`` (None: a stop was asked before it)."""
    host, port, num_clients = plan.host, plan.port, len(plan.nodes)
    # Client processes get their thread budget; the SuperLink (and the ServerApp it starts,
    # which evaluates the global model while the clients wait) keeps the machine's default.
    client_env = {**env, **client_runtime_env(plan.client_threads)}
    node_envs = start_spares(plan, group, client_env)
    link = group.start(
        "superlink",
        [
            _bin("flower-superlink"),
            *plan.superlink_args,
            "--host",
            host,
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        env,
    )
    wait_for_port(host, port, plan.startup_timeout, link)
    register_keys(plan.public_keys, env)
    for i, name in enumerate(plan.nodes):
        group.start(
            name,
            [
                _bin("flower-supernode"),
                *plan.supernode_args[name],
                "--superlink",
                f"{host}:{port}",
                "--port",
                str(free_port(host)),
                "--node-config",
                f"partition-id={i} num-partitions={num_clients} "
                f"warm-worker={str(plan.warm_worker).lower()} "
                f"fault-injection={str(plan.fault_injection).lower()}",
            ],
            node_envs[name],
        )
    LOGGER.info(
        "deployment engine: SuperLink on %s:%d, %d SuperNodes (logs in %s)",
        host,
        port,
        num_clients,
        group.log_dir,
    )
    if stop.is_set():
        return None
    return group.start("flwr-run", flwr_run_args(Path(plan.run_dir)), env)


def start_spares(plan: Plan, group: ProcessGroup, env: dict[str, str]) -> dict[str, dict]:
    """With the warm worker on, each node's spare worker (``fl_client.spare.spare_command``),
    started first: they load torch, Ultralytics and the trainer while the SuperLink starts and
    the run is submitted, and each node's first message adopts its own. Returns each node's
    environment (``env`` where there is no spare: ``FEDYOLO_WORKER_PRESTART=0``)."""
    from fl_client.spare import prestart, spare_command

    if not (plan.warm_worker and prestart(env)):
        return {name: env for name in plan.nodes}

    out = {}
    for name in plan.nodes:
        spec = spare_command(env=env, node=name)  # its SuperNode's name, for ps
        with spec.listener:
            group.start(f"{name}-spare", spec.cmd, spec.env, pass_fds=spec.fds)
        out[name] = spec.node_env
    return out


# -- the run's private network namespace ---------------------------------------------------
EXPOSED = (
    "every local user can reach this run's SuperLink and SuperNodes on loopback: list, start "
    "(its code then runs as you) and stop runs over the Control API, and pull the clients' "
    "tasks (weights, node config) with tokens read from /proc/*/cmdline"
)


def isolation_prefix(isolation: str, host: str) -> list[str]:
    """The command prefix that puts the run's processes in a private network namespace, or
    [] for ``engine.isolation=none`` (said in a warning). Raises DeployError (one line) where
    the namespace cannot be made or the host would be unreachable in it."""
    if isolation == "none":
        LOGGER.warning("engine.isolation=none: %s", EXPOSED)
        return []
    if isolation != "namespace":
        raise DeployError(f"engine.isolation={isolation!r}: one of namespace, none")
    if not _loopback(host):
        raise DeployError(
            f"engine.host={host} cannot be reached from outside the run's private network "
            "namespace: use 127.0.0.1 (this machine only), or engine.isolation=none, with "
            f"which {EXPOSED}"
        )
    prefix, why = namespace_command()
    if why:
        raise DeployError(
            f"engine=local-deployment: cannot make a private network namespace here ({why}); "
            f"without one {EXPOSED}. Allow unprivileged user namespaces (or run as root), or "
            "accept that for this run with engine.isolation=none"
        )
    return prefix


def namespace_command() -> tuple[list[str], str]:
    """(``unshare`` command prefix, "") where a private network namespace with loopback up
    can be made here, else ([], why not). As root ``unshare -n``; as another user
    ``unshare -rn`` (a user namespace where it is root, mapped to itself outside)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip") or shutil.which("ip", path=_SBIN)
    if not unshare or not ip:
        return [], f"{'unshare' if not unshare else 'ip'} (util-linux, iproute2) is not installed"
    prefix = [unshare, "-n"] if os.geteuid() == 0 else [unshare, "-r", "-n"]
    shown = " ".join(["unshare", *prefix[1:]])
    prefix += ["--", "env", f"FEDYOLO_IP={ip}"]
    try:
        done = subprocess.run(
            [*prefix, ip, "link", "set", "lo", "up"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"{shown}: {e}"
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split())[:200]
        return [], f"{shown} failed: {said or f'exit {done.returncode}'}"
    return prefix, ""


_SBIN = "/usr/sbin:/sbin"


def _loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"


def _launch(spec: Path) -> int:
    """The launcher, inside the run's network namespace: loopback up, then the federation
    (:func:`start_federation`), waited for; its processes are stopped when it ends."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    plan = Plan(**json.loads(spec.read_text()))
    run = RunDir(Path(plan.run_dir))
    group = ProcessGroup(run.logs)  # not by FLWR_HOME: this process carries it too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the `finally` below runs
    stop = StopFile(run.interrupt)
    try:
        up = subprocess.run(
            [os.environ.get("FEDYOLO_IP", "ip"), "link", "set", "lo", "up"],
            capture_output=True,
            text=True,
        )
        if up.returncode != 0:
            raise RuntimeError(f"ip link set lo up failed in the namespace: {up.stderr.strip()}")
        runner = start_federation(plan, group, dict(os.environ), stop)
    except (RuntimeError, TimeoutError) as e:  # the one line the driver reports
        LOGGER.error("%s", " ".join(str(e).split())[:1000])
        group.stop()
        return LAUNCH_FAILED
    try:
        return 130 if runner is None else runner.wait()
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
    register_keys([str(keys.public) for keys in security.node_keys.values()], env)


def register_keys(public_keys: list[str], env: dict[str, str]) -> None:
    for public in public_keys:
        flwr_cli(["supernode", "register", public, FEDERATION], env)


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


def flwr_run_args(run_dir: Path, app: Path = PROJECT_ROOT) -> list[str]:
    """``flwr run`` of this project (``app``: its source folder, with ``pyproject.toml``) on the
    deployment's SuperLink, for the prepared run."""
    return [
        _bin("flwr"),
        "run",
        str(app),
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
    from fl_client import faults  # Flower's message types (fl_client.wire): not at --help

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
        isolation=str(e.get("isolation", "namespace")),
        # this run's own SuperNodes act out the faults its config injects (fl_client.faults)
        fault_injection=bool(faults.parse(cfg.faults, int(cfg.federation.clients))),
    )


def follow(runner: subprocess.Popen, run_dir: Path, before: int, stop: StopFile) -> None:
    """Wait for ``flwr run`` to end: a ``run_end`` event after the first ``before`` events.

    After a Ctrl-C/SIGTERM the ServerApp ends the run ``interrupted`` and this raises
    ``KeyboardInterrupt`` (the CLI exits 130); a ServerApp that has not ended within
    ``STOP_GRACE`` seconds is killed with the rest.
    """
    run = RunDir(run_dir)
    asked_at = None
    while runner.poll() is None:
        if any(e["kind"] == EventKind.RUN_END for e in run.read_events()[before:]):
            break
        if asked_at is None and stop.is_set():
            asked_at = time.monotonic()
        if asked_at is not None and time.monotonic() - asked_at > STOP_GRACE:
            LOGGER.warning("the ServerApp did not stop within %.0f s: killing it", STOP_GRACE)
            break
        time.sleep(0.5)
    if stop.is_set():
        raise KeyboardInterrupt
    status = (run.read_summary() or {}).get("status")
    if status not in (Status.COMPLETED, *STOP_STATUSES):  # stopped/pruned: by design (guard, hooks)
        log = run.logs / "flwr-run.log"
        raise RuntimeError(
            f"deployment run ended with status {status!r}; last lines of {log}:\n{tail(log)}"
        )


if __name__ == "__main__":  # the launcher in the run's network namespace (run_local_deployment)
    sys.exit(_launch(Path(sys.argv[1])))
