"""The ``compose`` engine: the federation in containers on this machine's Docker engine.

``fedyolo run engine=compose federation.clients=N`` runs ``docker-compose.yml`` (the repository's,
the one users run by hand): a TLS SuperLink in the server image, whose subprocess is the
fedyolo ServerApp writing the run directory, and one SuperNode per client in the client image,
each authenticated by its own key and reading only its own shard, mounted read-only at
``/data`` and named by its node config ``data-path``. The steps:

1. images: built when missing (``engine.build``), offline from the local base and wheelhouse
   when ``engine.offline`` (``deploy.images``);
2. certificates and keys: ``deploy.local.make_security``, the one implementation the
   ``local-deployment`` engine uses, with the service name ``superlink`` in the certificate;
3. shards: each client's shard exported self-contained (links resolved, a ``data.yaml``
   relative to its folder) under ``runs/<name>/compose/shards/client_<i>``; the server's
   held-out images are resolved in place. The SuperLink container sees its own certificate
   and key, the CA's certificate, the run directory at the same path with the run's keys
   (``.flwr``) and every client's shard (``data/``, ``compose/``) hidden behind empty
   folders, and the held-out set read-only; :func:`check_superlink_view` checks that view of
   the rendered compose files before anything starts;
4. ``compose up`` of the SuperLink, registration of the SuperNodes' public keys, ``compose up``
   of the SuperNodes, ``flwr run`` from this machine through the SuperLink's port published on
   loopback, followed to its ``run_end`` exactly as in ``local-deployment``;
5. always (success, failure, Ctrl-C, SIGTERM): the containers' logs go to ``runs/<name>/logs``
   and ``compose down --volumes`` removes the containers, the network and the volumes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from deploy import DeployError, images
from deploy.local import (
    PROJECT_ROOT,
    ProcessGroup,
    flwr_env,
    flwr_run_args,
    follow,
    free_port,
    make_security,
    node_names,
    register_nodes,
)
from fl_server import config as config_mod
from fl_server.engines import RunDir, Status, StopFile, interrupts_to

LOGGER = logging.getLogger("fedyolo")

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
CONTAINER_UID = 10001  # the images' user
SUPERLINK = "superlink"


class ComposeError(DeployError):
    """The engine cannot start or a compose step failed; the message names the step."""


def compose_cli() -> list[str]:
    """``docker compose`` (v2) where the plugin exists, else ``docker-compose`` (v1)."""
    docker = shutil.which("docker")
    v2 = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if v2 and v2.returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise ComposeError("neither `docker compose` (v2) nor `docker-compose` (v1) is installed")


def project_name(run_dir: Path) -> str:
    """A compose project name of this run: lowercase, unique per run directory."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_dir.name.lower()).strip("-")[:30] or "run"
    return f"fedyolo-{slug}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]}"


def export_shard(shard: Path, out: Path) -> Path:
    """``shard`` (a written client shard) as a self-contained folder: every link resolved (a
    hard link where the filesystem allows, else a copy) and a ``data.yaml`` without ``path:``,
    so it reads the same wherever it is mounted. Returns the new ``data.yaml``."""
    data = yaml.safe_load((shard / "data.yaml").read_text())
    data.pop("path", None)
    for src in sorted(shard.rglob("*")):
        if src.is_dir() or src.name in ("data.yaml",) or src.suffix == ".cache":
            continue
        dst = out / src.relative_to(shard)
        dst.parent.mkdir(parents=True, exist_ok=True)
        _materialize(src.resolve(), dst)
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out / "data.yaml"


def resolve_links(folder: Path) -> int:
    """Replace every symlink under ``folder`` by its target's content (hard link or copy), so
    that a container that mounts only ``folder`` can read it; the number replaced."""
    n = 0
    for link in sorted(folder.rglob("*")):
        if link.is_symlink():
            tmp = link.with_name(f".{link.name}.resolving")
            _materialize(link.resolve(), tmp)
            os.replace(tmp, link)
            n += 1
    return n


def _materialize(src: Path, dst: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def client_services(compose: dict, num_clients: int) -> dict[str, dict]:
    """The ``supernode-<i>`` services for ``num_clients`` clients, made from ``supernode-0`` of
    the compose file (clients the file lists are kept as written): its shard, key and state
    folder are the client's own."""
    template = compose["services"]["supernode-0"]
    out = {}
    for i in range(num_clients):
        name = f"supernode-{i}"
        if name in compose["services"]:
            continue
        text = yaml.safe_dump(copy.deepcopy(template))
        text = (
            text.replace("partition-id=0 ", f"partition-id={i} ")
            .replace("supernodes/supernode-0:", f"supernodes/{name}:")
            .replace("/client_0:", f"/client_{i}:")
            .replace("node-state}/supernode-0:", f"node-state}}/{name}:")
        )
        out[name] = yaml.safe_load(text)
    return out


_NOT_FOR_CLI = ("PYTHONPATH", "PYTHONHOME")


# -- what a container sees ------------------------------------------------------------------
_VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?:(:?-)([^}]*))?\}|(\w+))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution (``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``) applied to every string of ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        got = env.get(name)
        if m.group(2) == ":-" and not got or m.group(2) == "-" and got is None:
            return m.group(3)
        return got or ""

    return _VARIABLE.sub(one, value)


@dataclass(frozen=True)
class Mount:
    target: str  # the path in the container
    source: Path | None  # the host path of a bind mount; None: a tmpfs or a named volume
    read_only: bool


def service_mounts(service: str, env: dict[str, str], files: list[Path]) -> list[Mount]:
    """The mounts of ``service`` as compose renders ``files`` (the later override the earlier,
    volumes by their target) with the environment file's ``env``; relative host paths are
    taken from the first file's folder, as compose does."""
    by_target: dict[str, Mount] = {}
    for f in files:
        spec = (yaml.safe_load(Path(f).read_text()).get("services") or {}).get(service) or {}
        for v in interpolate(spec.get("volumes") or [], env):
            m = _mount(v, Path(files[0]).parent)
            by_target[m.target] = m
    return list(by_target.values())


def _mount(v, base: Path) -> Mount:
    if isinstance(v, dict):  # long syntax
        src, target, ro = v.get("source"), str(v["target"]), bool(v.get("read_only"))
        bind = v.get("type") == "bind"
    else:
        parts = str(v).split(":")
        src, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
        ro = len(parts) > 2 and "ro" in parts[2].split(",")
        bind = len(parts) > 1 and src.startswith((".", "/", "~"))
    source = Path(os.path.abspath(base / Path(src).expanduser())) if bind and src else None
    return Mount(os.path.normpath(target), source, ro)


def visible_at(host_path: Path, mounts: list[Mount]) -> str | None:
    """Where the host file ``host_path`` can be read inside the container, or None: each bind
    mount that holds it, unless a deeper mount (an empty tmpfs, another bind) covers that
    path in the container."""
    host = Path(os.path.abspath(host_path))
    for m in mounts:
        if m.source is None or not host.is_relative_to(m.source):
            continue
        inside = os.path.normpath(os.path.join(m.target, host.relative_to(m.source)))
        top = max(
            (n for n in mounts if inside == n.target or inside.startswith(n.target + "/")),
            key=lambda n: len(n.target),
        )
        if top.source is not None and top.source / os.path.relpath(inside, top.target) == host:
            return inside
    return None


def superlink_secrets(secrets: Path) -> list[Path]:
    """Every private key of the run but the SuperLink's own (the CA's, every SuperNode's)."""
    return [
        p
        for p in sorted(secrets.rglob("*"))
        if p.is_file() and p.name != "superlink.key" and not p.name.endswith((".crt", ".pub"))
    ]


def check_superlink_view(run_dir: Path, env: dict[str, str], files: list[Path]) -> None:
    """Refuse to start a SuperLink container that could read a key not its own or a client's
    shard (a compose file changed by hand, a layout changed in code)."""
    mounts = service_mounts(SUPERLINK, env, files)
    shards = RunDir(run_dir).data.glob(f"{RunDir.CLIENT_SHARD}*/**/*")
    hidden = [
        *superlink_secrets(Path(env["FEDYOLO_SECRETS"])),
        *(p for p in sorted(shards) if p.is_file()),
        *(p for p in sorted(Path(env["FEDYOLO_SHARDS"]).rglob("*")) if p.is_file()),
    ]
    seen = [p for p in hidden if visible_at(p, mounts) or visible_at(p.resolve(), mounts)]
    if seen:
        raise ComposeError(
            f"the SuperLink container would read {len(seen)} file(s) that are not the "
            f"server's, e.g. {seen[0]}: {', '.join(map(str, files))} mounts too much; refused"
        )


# -- what the SuperLink container reads from the host ---------------------------------------
@dataclass(frozen=True)
class Input:
    key: str  # the config key that names it
    path: Path  # the host path (absolute)
    mounted: bool  # read in the SuperLink container (else read on the host only)


def container_inputs(cfg) -> list[Input]:
    """Every file or folder the config names, and whether the SuperLink container reads it.

    Only ``model.cfg`` (a ``.pt`` to fine-tune or a model yaml given by path) is read there, by
    the ServerApp building the initial model. ``distill.teacher`` is copied into the run by
    ``prepare_run`` (the ServerApp reads ``runs/<name>/teacher.pt``); ``data.path`` is read on
    the host, which writes the clients' shards and the held-out set into the run; an INT8
    calibration folder belongs to ``fedyolo export``, on the host; clients read only their
    shard. A yaml shipped with fedyolo or Ultralytics is in the image: not an input.
    """
    out = []
    for key in ("model.cfg", "distill.teacher", "data.path"):
        value = OmegaConf.select(cfg, key)
        if value in (None, ""):
            continue
        path = Path(str(value)).expanduser()
        if key == "model.cfg" and not path.exists() and not str(value).endswith(".pt"):
            continue  # a shipped yaml by name (fedyolo-tiny.yaml, yolov8n.yaml): in the image
        out.append(Input(key, Path(os.path.abspath(path)), key == "model.cfg"))
    return out


def stage_inputs(run_dir: Path, cfg, base_files: list[Path], env: dict[str, str]) -> dict:
    """Check every input on the host (one line naming the key and the path) and make those
    the SuperLink container reads visible to it: read-only at the same absolute path (the run's
    ``config.yaml`` gets that absolute path where it was relative). Returns the override
    (``services.superlink.volumes``), empty when nothing needs mounting."""
    volumes = []
    mounts = service_mounts(SUPERLINK, env, base_files)
    for item in container_inputs(cfg):
        if not item.path.exists():
            raise ComposeError(
                f"{item.key}={item.path}: not found on this machine; nothing was started"
            )
        if not item.mounted:
            continue
        if not item.path.is_file():
            raise ComposeError(f"{item.key}={item.path}: not a file; nothing was started")
        if str(OmegaConf.select(cfg, item.key)) != str(item.path):
            _set_in_run_config(run_dir, item.key, str(item.path))
        if visible_at(item.path, mounts) == str(item.path):
            continue  # already in the container at that path (the run directory)
        # long syntax: a ':' in a path cannot split it; '$' is escaped from interpolation
        volumes.append(
            {
                "type": "bind",
                "source": str(item.path.resolve()).replace("$", "$$"),
                "target": str(item.path).replace("$", "$$"),
                "read_only": True,
            }
        )
    return {"services": {SUPERLINK: {"volumes": volumes}}} if volumes else {}


def _set_in_run_config(run_dir: Path, key: str, value: str) -> None:
    path = RunDir(run_dir).config
    run_cfg = config_mod.load(path)
    OmegaConf.update(run_cfg, key, value)
    path.write_text(config_mod.to_yaml(run_cfg))


_STAMP = re.compile(r"^\S+\s+\|\s+|^\d{4}-\d\d-\d\dT\S+\s+")
_RAISED = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\b:?\s*(.*)$")


def failure_reason(run_dir: Path, logs: Path) -> str | None:
    """Why the run failed in the SuperLink container, in one line: the reason the ServerApp
    wrote in ``summary.json``, else the last exception in the SuperLink's log (the ServerApp's
    output goes there), else None."""
    summary = RunDir(run_dir).read_summary() or {}
    if summary.get("status") == Status.FAILED and summary.get("reason"):
        return str(summary["reason"])
    log = logs / f"{SUPERLINK}.log"
    if not log.is_file():
        return None
    lines = [_STAMP.sub("", _STAMP.sub("", x)).strip() for x in log.read_text().splitlines()]
    for line in reversed(lines):
        m = _RAISED.match(line)
        if m and m.group(1) and not line.startswith(("Traceback", "flwr.")):
            return " ".join(line.split())[:500]
    for line in reversed(lines):
        if "ERROR" in line:
            return " ".join(line.split())[:500]
    return None


class Compose:
    """One compose project of one run: ``up``, ``logs``, ``down``."""

    def __init__(self, run_dir: Path, env: dict[str, str], extra_files: list[Path]):
        self.cli = compose_cli()
        self.project = project_name(run_dir)
        self.env_file = run_dir / "compose.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
        # The compose CLI is another program: v1 is a Python program of the system, which an
        # inherited PYTHONPATH (Flower's Ray backend exports this interpreter's sys.path into
        # os.environ) would make import this environment's docker SDK, and fail.
        self.env = {k: v for k, v in {**os.environ, **env}.items() if k not in _NOT_FOR_CLI}
        files = [COMPOSE_FILE, *extra_files]
        self.files = files
        self.base = [
            *self.cli,
            "--project-name",
            self.project,
            "--env-file",
            str(self.env_file),
            *[a for f in files for a in ("--file", str(f))],
        ]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        done = subprocess.run(
            [*self.base, *args],
            env=self.env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise ComposeError(
                f"compose {' '.join(args[:2])} failed (exit {done.returncode}): "
                f"{(done.stdout + done.stderr)[-1500:]}"
            )
        return done.stdout

    def container(self, service: str) -> str:
        return self("ps", "-q", service).strip()

    def wait_healthy(self, service: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            cid = self.container(service)
            if cid:
                status = _inspect(cid, "{{.State.Status}} {{.State.Health.Status}}")
                if status.endswith("healthy") and not status.endswith("unhealthy"):
                    return
                if status.startswith(("exited", "dead", "restarting")):
                    break
            time.sleep(1)
        raise ComposeError(
            f"{service} is not healthy after {timeout:.0f} s ({status or 'no container'}); "
            f"its log:\n{self('logs', '--no-color', '--tail', '30', service, check=False)}"
        )

    def started_at(self, service: str) -> str:
        """When the service's container last started ('' if it has none)."""
        cid = self.container(service)
        return _inspect(cid, "{{.State.StartedAt}}") if cid else ""

    def save_logs(self, folder: Path, services: list[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for service in services:
            with contextlib.suppress(Exception):
                log = self("logs", "--no-color", "--timestamps", service, check=False, timeout=60)
                (folder / f"{service}.log").write_text(log)

    def down(self, check: bool = False) -> None:
        self("down", "--volumes", "--remove-orphans", "--timeout", "20", check=check)

    def down_command(self) -> str:
        """The shell command that removes this project (what ``engine.keep=true`` leaves)."""
        cli = " ".join(Path(self.cli[0]).name if i == 0 else a for i, a in enumerate(self.cli))
        files = " ".join(f"-f {f}" for f in self.files)
        return (
            f"{cli} -p {self.project} --env-file {self.env_file} {files} "
            "down --volumes --remove-orphans"
        )


def _inspect(cid: str, fmt: str) -> str:
    done = subprocess.run(
        [images.docker_cli(), "inspect", "--format", fmt, cid],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip()


def _cpus(asked: float, key: str) -> float:
    """``asked`` CPUs, at most this machine's (Docker refuses more than there are)."""
    have = float(os.cpu_count() or 1)
    if asked > have:
        LOGGER.info("engine.%s=%s: this machine has %d CPUs, the limit", key, asked, have)
        return have
    return asked


def native_platform() -> str:
    """The Docker engine's own platform (linux/amd64 or linux/arm64): ``client_platform=auto``."""
    arch = images._out([images.docker_cli(), "info", "--format", "{{.Architecture}}"])
    return "linux/arm64" if arch in ("aarch64", "arm64") else "linux/amd64"


def ensure_images(e) -> tuple[str, str]:
    """The server and client image tags, built as ``engine.build`` says: ``missing`` builds
    those that do not exist or were built from other source than this checkout's (their
    ``io.fedyolo.source`` label), ``always`` both, ``never`` none."""
    tags = {"server": str(e.server_image), "client": str(e.client_image)}
    client = str(e.get("client_platform", "auto"))
    client = native_platform() if client == "auto" else client
    platforms = {"server": "linux/amd64", "client": client}
    mode = str(e.build)
    if mode not in ("missing", "always", "never"):
        raise ComposeError(f"engine.build={mode!r}: one of missing, always, never")
    cli = images.docker_cli()
    why = images.outdated(tags, cli, platforms)
    missing = [r for r, w in why.items() if w == "missing"]
    if mode == "never" and missing:
        raise ComposeError(
            f"engine.build=never but {', '.join(tags[r] for r in missing)} does not exist: "
            "`fedyolo deploy images` (or `make images`) builds it"
        )
    wrong = [r for r, w in why.items() if w.startswith("built for")]
    if mode == "never" and wrong:
        r = wrong[0]
        raise ComposeError(
            f"engine.build=never but {tags[r]} is {why[r].removeprefix('built for ')} "
            f"(engine.{r}_platform={platforms[r]})"
        )
    for r, w in why.items():
        if w != "missing":
            LOGGER.warning("compose engine: %s was %s", tags[r], w)
    roles = tuple(images.ROLES) if mode == "always" else ()
    if mode == "missing":
        roles = tuple(why)
    for platform in dict.fromkeys(platforms[r] for r in roles):  # amd64 first: shared layers
        these = tuple(r for r in roles if platforms[r] == platform)
        LOGGER.info("compose engine: building %s", ", ".join(tags[r] for r in these))
        for built in images.build_images(
            offline=bool(e.offline),
            base=(str(e.base_image) or None) if platform == "linux/amd64" else None,
            roles=these,
            tags=tags,
            platform=platform,
        ):
            gb = built.size_bytes / 1e9
            LOGGER.info("built %s in %.0f s (%.2f GB)", built.tag, built.seconds, gb)
    return tags["server"], tags["client"]


def _owner_env(paths: list[Path]) -> dict[str, str]:
    """Who the containers run as: this user, or (as root) the images' own user, to whom the
    mounted folders are then handed (root keeps its access)."""
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        return {"FEDYOLO_UID": str(uid), "FEDYOLO_GID": str(gid)}
    for path in paths:
        for p in [path, *path.rglob("*")]:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(p, CONTAINER_UID, CONTAINER_UID)
    return {"FEDYOLO_UID": str(CONTAINER_UID), "FEDYOLO_GID": str(CONTAINER_UID)}


def mount_environment(run_dir: Path) -> dict[str, str]:
    """Where docker-compose.yml finds this run's files: the run directory, its keys (made by
    ``make_security`` in the Flower home ``.flwr``), the clients' exported shards and their
    state folders."""
    return {
        "FEDYOLO_RUN_DIR": str(run_dir),
        "FEDYOLO_SECRETS": str(RunDir(run_dir).flwr_home / "secrets"),
        "FEDYOLO_SHARDS": str(run_dir / "compose" / "shards"),
        "FEDYOLO_NODE_STATE_DIR": str(run_dir / "compose" / "node-state"),
    }


def run_compose(run_dir: Path, cfg) -> None:
    """Run the prepared run directory's federation in containers (see the module docstring)."""
    from fl_client import faults  # Flower's message types (fl_client.wire): not at --help

    e = cfg.engine
    num_clients = int(cfg.federation.clients)
    server_image, client_image = ensure_images(e)
    run_dir = run_dir.resolve()
    run = RunDir(run_dir)
    work = run_dir / "compose"
    flwr_home = run.flwr_home
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.chmod(flwr_home, 0o700)
    secrets = Path(mount_environment(run_dir)["FEDYOLO_SECRETS"])
    nodes = node_names(num_clients)
    security = make_security(secrets, [SUPERLINK, "localhost", "127.0.0.1"], nodes, False)
    shards = Path(mount_environment(run_dir)["FEDYOLO_SHARDS"])
    for shard in (run.client_shard(i) for i in range(num_clients)):
        export_shard(shard, shards / shard.name)
    resolve_links(run.server_val)
    node_state = Path(mount_environment(run_dir)["FEDYOLO_NODE_STATE_DIR"])
    for name in nodes:  # each client's /state: the node ID its entry point signs off
        (node_state / name).mkdir(mode=0o700, parents=True, exist_ok=True)
    port = int(e.port) or free_port()
    env = flwr_env(flwr_home, f"127.0.0.1:{port}", security)
    compose_env = {
        "FEDYOLO_SERVER_IMAGE": server_image,
        "FEDYOLO_CLIENT_IMAGE": client_image,
        **mount_environment(run_dir),
        "FEDYOLO_PORT": str(port),
        "FEDYOLO_CLIENTS": str(num_clients),
        "FEDYOLO_CLIENT_CPUS": str(_cpus(float(e.client_cpus), "client_cpus")),
        "FEDYOLO_CLIENT_MEMORY": str(e.client_memory),
        "FEDYOLO_SERVER_CPUS": str(_cpus(float(e.server_cpus), "server_cpus")),
        "FEDYOLO_SERVER_MEMORY": str(e.server_memory),
        "FEDYOLO_CLIENT_THREADS": str(e.client_threads),
        "FEDYOLO_WARM_WORKER": str(bool(e.warm_worker)).lower(),
        # this run's own SuperNodes act out the faults its config injects (fl_client.faults)
        "FEDYOLO_FAULT_INJECTION": str(bool(faults.parse(cfg.faults, num_clients))).lower(),
        **_owner_env([run_dir]),
    }
    extra = client_services(yaml.safe_load(COMPOSE_FILE.read_text()), num_clients)
    extra_files = []
    if extra:
        override = work / "compose.clients.yml"
        override.write_text(yaml.safe_dump({"services": extra}, sort_keys=False))
        extra_files.append(override)
    limits = work / "compose.limits.yml"  # integers: Compose v1 does not convert a ${VARIABLE}
    pids = {SUPERLINK: int(e.server_pids), **{n: int(e.client_pids) for n in nodes}}
    limits.write_text(yaml.safe_dump({"services": {s: {"pids_limit": n} for s, n in pids.items()}}))
    extra_files.append(limits)
    inputs = stage_inputs(run_dir, cfg, [COMPOSE_FILE, *extra_files], compose_env)
    if inputs:
        override = work / "compose.inputs.yml"
        override.write_text(yaml.safe_dump(inputs, sort_keys=False))
        extra_files.append(override)
    check_superlink_view(run_dir, compose_env, [COMPOSE_FILE, *extra_files])
    project = Compose(run_dir, compose_env, extra_files)
    group = ProcessGroup(run.logs, flwr_home=str(flwr_home))
    stop = StopFile(run.interrupt)
    stop.clear()
    following = threading.Event()
    services = [SUPERLINK, *nodes]
    with interrupts_to(stop, armed=following.is_set):
        try:
            project("up", "--detach", "--no-build", SUPERLINK)
            project.wait_healthy(SUPERLINK, float(e.startup_timeout))
            register_nodes(security, env)
            project("up", "--detach", "--no-build", *nodes)
            LOGGER.info(
                "compose engine: project %s, SuperLink on 127.0.0.1:%d, %d SuperNodes "
                "(container logs in %s at the end)",
                project.project,
                port,
                num_clients,
                run.logs,
            )
            try:
                _submit_and_follow(project, group, run_dir, env, stop, following, e)
            except RuntimeError as err:
                if isinstance(err, ComposeError):
                    raise
                group.stop()
                project.save_logs(run.logs, services)
                why = failure_reason(run_dir, run.logs)
                if why is None:
                    raise
                raise ComposeError(
                    f"the run failed in the SuperLink container: {why} "
                    f"(logs: {run.logs / (SUPERLINK + '.log')})"
                ) from err
        finally:
            group.stop()
            project.save_logs(run.logs, services)
            if not bool(e.keep):
                project.down()
            else:
                LOGGER.warning(
                    "engine.keep=true: the containers, network and volumes stay; remove them "
                    "with `make compose-down RUN=%s` or: %s",
                    run_dir,
                    project.down_command(),
                )


RESUMES = 3  # SuperLink restarts one run survives by resuming itself


def _submit_and_follow(project, group, run_dir, env, stop, following, e) -> None:
    """``flwr run`` followed to its end, resubmitted after a SuperLink container restart
    (seen in the container's start time; ``submit_and_follow``)."""
    started = [project.started_at(SUPERLINK)]

    def restarted() -> bool:
        # `flwr run` may end before Docker has restarted the container: wait for it
        now = _restarted(project, started[0], wait=min(60.0, float(e.startup_timeout)))
        if now:
            started[0] = now
            project.wait_healthy(SUPERLINK, float(e.startup_timeout))
        return bool(now)

    submit_and_follow(group, run_dir, env, stop, following, restarted, flwr_run_args(run_dir))


def submit_and_follow(
    group, run_dir, env, stop, following, restarted: Callable[[], bool], submit: list[str]
) -> None:
    """``flwr run`` (``submit``: its command) and follow it to its end. If the SuperLink
    restarts mid-run (its ServerApp, a subprocess, dies with it; its database and the
    SuperNodes live on), ``flwr run`` ends while the run is ``running``; when ``restarted()``
    (it waits for the SuperLink to be back) says so, the run is resubmitted as ``resume=`` of
    its own directory: it goes on from its last finished round, nothing lost or counted twice
    (``fl_server.state``); a ``resume`` event records it. At most ``RESUMES`` times."""
    for attempt in range(RESUMES + 1):
        before = len(RunDir(run_dir).read_events())
        runner = group.start("flwr-run", submit, env)
        following.set()
        try:
            follow(runner, run_dir, before, stop)
            return
        except RuntimeError:
            if stop.is_set() or attempt == RESUMES or not _under_way(run_dir):
                raise
            if not restarted():
                raise
        LOGGER.warning(
            "the SuperLink restarted mid-run: the run resumes from its last finished round "
            "(%d of %d resumes)",
            attempt + 1,
            RESUMES,
        )
        runner.wait(timeout=30)
        _resume_config(run_dir)


def _status(run_dir: Path) -> str | None:
    """The run's status in summary.json (``running`` while a ServerApp has not ended it)."""
    return (RunDir(run_dir).read_summary() or {}).get("status")


def _under_way(run_dir: Path) -> bool:
    """Whether a ServerApp had the run under way when ``flwr run`` ended, so a resume can go
    on with it: its summary says ``running``, or it has no summary yet but a resumable state.
    The first summary comes with round 1's hooks, after the round's record and state: a
    SuperLink killed in that window leaves the state of round 0 or 1 and no summary."""
    status = _status(run_dir)
    return status == Status.RUNNING or (status is None and RunDir(run_dir).state.is_file())


def _restarted(project: Compose, started: str, wait: float) -> str:
    """The SuperLink container's new start time if it restarts within ``wait`` s, else ''."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        now = project.started_at(SUPERLINK)
        if now and now != started:
            return now
        time.sleep(1)
    return ""


def _resume_config(run_dir: Path) -> None:
    """The run's config.yaml with ``resume`` set, as ``fedyolo run resume=`` writes it."""
    cfg = config_mod.compose([f"resume={run_dir}"])
    RunDir(run_dir).config.write_text(config_mod.to_yaml(cfg))


def engine(run, cfg) -> None:
    """The ``compose`` engine (``fl_server.engines``), ``configs/engine/compose.yaml``."""
    run_compose(run.path, cfg)


def down(run_dir: Path) -> str:
    """Remove what a run's compose project left (``engine.keep=true``, a killed ``fedyolo``):
    its containers, network and volumes. Returns the project's name.

    The run directory may come from someone else: only the ``FEDYOLO_*`` values of its
    ``compose.env`` are read (never ``PATH``, ``DOCKER_HOST``, ``COMPOSE_*``... for the compose
    CLI), and its override files are not (a volume they name could be anyone's): the project
    is this installation's docker-compose.yml under the name derived from the run's path, and
    the clients past 2 go as its orphans."""
    run_dir = Path(run_dir).resolve()
    env_file = run_dir / "compose.env"
    if not env_file.is_file():
        raise ComposeError(f"{run_dir}: no compose.env (not a run of engine=compose)")
    pairs = (line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    env = {k: v for k, v in pairs if re.fullmatch(r"FEDYOLO_[A-Z0-9_]+", k)}
    project = Compose(run_dir, env, [])
    project.down(check=True)
    return project.project


if __name__ == "__main__":  # python -m deploy.compose down runs/<name>  (make compose-down)
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "down":
        sys.exit("usage: python -m deploy.compose down runs/<name>")
    try:
        print(f"removed compose project {down(Path(sys.argv[2]))}")
    except ComposeError as err:
        sys.exit(f"fedyolo: error: {err}")
