"""The ``superlink`` engine: the prepared run submitted to a SuperLink that already runs.

On a fleet (the EC2 server instance, a lab machine) the SuperLink is a long-lived service,
started by the machine and not by ``fedyolo run``: TLS, ``--enable-supernode-auth``, a
database that outlives one run, and its ServerApp as its own subprocess. What an operator did
by hand there is this engine: wait for the SuperLink's port, register the slots' public keys
(``engine.public_keys``: a folder of ``*.pub``), submit the run with ``flwr run`` and follow it
to its ``run_end``, with the functions of ``deploy.local`` (``flwr_env``, ``register_keys``,
``flwr_run_args``, ``follow``) that the other deployment engines use.

**One path for the run directory.** ``flwr run`` hands the SuperLink the run directory's path
(``run-dir``); the ServerApp opens that path inside the SuperLink's process or container. So
the run directory must be at the same path here and there: on a server instance one host
folder is mounted at the same path in the SuperLink container and wherever this engine runs
(``docs/how-to/fleet-data.md``). The engine writes its Flower home (``<run>/.flwr``: the CLI's
``config.toml``, nothing secret) there too.

**Re-runs and replacements.** A key the SuperLink's database already holds ("Public key
already in use") is fine: a replacement server, or the same run resubmitted, registers the
same slots again. A new SuperLink (a fresh database) gets them all.

**A SuperLink restart mid-run** (its container or service restarted; its ServerApp dies with
it, the SuperNodes reconnect) ends ``flwr run`` while the run's ``summary.json`` still says
``running`` (or, killed within round 1 before its first summary, while a resumable state
exists: ``deploy.compose._under_way``). As the compose engine does, the run is then
resubmitted as ``resume=`` of its own directory (``deploy.compose.submit_and_follow``, at
most ``RESUMES`` times) once the SuperLink's port is back, and goes on from its last finished
round; the keys are registered again first (a database rebuilt at boot has none). The
compose engine sees the restart (the container's start time); this engine cannot, so before
each resubmission it stops the run it submitted (``flwr stop``; refused when the SuperLink no
longer has it running, which is what a restart leaves), so that two ServerApps never write one
run directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path

from deploy import DeployError
from deploy.compose import submit_and_follow
from deploy.local import (
    FEDERATION,
    PROJECT_ROOT,
    ProcessGroup,
    Security,
    flwr_cli,
    flwr_env,
    flwr_run_args,
    register_keys,
    tail,
    wait_for_port,
)
from fl_server.engines import RunDir, StopFile, interrupts_to

LOGGER = logging.getLogger("fedyolo")

# Flower 1.41's answer to a public key it holds already (PUBLIC_KEY_ALREADY_IN_USE)
ALREADY = "already in use"
UNSET = {
    "root_ca": "give the CA certificate that signed the SuperLink's, engine.root_ca=PATH",
    "public_keys": "give the folder of the slots' *.pub keys, engine.public_keys=DIR",
}
_STARTED = re.compile(r"Successfully started run (\d+)")


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) of ``engine.address``; one line if it is not one."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"engine.address={address!r}: give host:port, e.g. 10.0.1.10:9092")
    return host.strip("[]"), int(port)


def public_keys(folder: Path) -> list[Path]:
    """The ``*.pub`` node keys of ``folder``, sorted; one line if there is none."""
    keys = sorted(folder.glob("*.pub")) if folder.is_dir() else []
    if not keys:
        raise DeployError(
            f"engine.public_keys={str(folder)!r}: no *.pub node public key there; give the "
            "folder holding the slots' public keys (fedyolo deploy certs writes them)"
        )
    return keys


def register_all(keys: list[Path], env: dict[str, str]) -> tuple[int, int]:
    """Register each key; one the SuperLink already holds counts as done. (new, known)."""
    new = known = 0
    for key in keys:
        try:
            register_keys([str(key)], env)
            new += 1
        except RuntimeError as e:
            if ALREADY not in str(e).lower():
                raise
            known += 1
    return new, known


def cli_security(root_ca: Path) -> Security:
    """What ``flwr_env`` needs to write the CLI's config: the CA the SuperLink's certificate is
    checked against (the SuperLink's own keys stay with it)."""
    return Security([], f"root-certificates = {json.dumps(str(root_ca))}\n", {}, root_ca)


def run_on_superlink(
    run_dir: Path,
    *,
    address: str,
    root_ca: Path,
    keys_dir: Path,
    startup_timeout: float,
    app: Path = PROJECT_ROOT,
) -> None:
    """Register the keys, submit ``run_dir`` to the SuperLink at ``address`` and follow it;
    ``app``: the fedyolo source folder ``flwr run`` packs (its ``pyproject.toml``)."""
    host, port = split_address(address)
    for key, given in (("root_ca", root_ca), ("public_keys", keys_dir)):
        if given == Path(""):
            raise DeployError(f"engine.{key} is not set: {UNSET[key]}")
    root_ca = root_ca.expanduser().resolve()
    if not root_ca.is_file():
        raise DeployError(
            f"engine.root_ca={str(root_ca)!r} does not exist: give the CA certificate that "
            "signed the SuperLink's (the flwr CLI's root-certificates)"
        )
    keys = public_keys(keys_dir.expanduser())
    if not (app / "pyproject.toml").is_file():
        raise DeployError(
            f"engine.app={str(app)!r} has no pyproject.toml: give the fedyolo source folder "
            "flwr run submits (/opt/fedyolo/app in the server image)"
        )
    run_dir = run_dir.resolve()
    run = RunDir(run_dir)
    run.flwr_home.mkdir(parents=True, exist_ok=True)
    os.chmod(run.flwr_home, 0o700)
    env = flwr_env(run.flwr_home, f"{host}:{port}", cli_security(root_ca))
    try:
        wait_for_port(host, port, startup_timeout)
    except TimeoutError as e:
        raise DeployError(f"engine.address={address}: {e}; is the SuperLink up?") from None
    new, known = register_all(keys, env)
    LOGGER.info(
        "superlink engine: %s, %d node keys registered (%d already were); run directory %s "
        "(the SuperLink must see it at this same path)",
        address,
        new,
        known,
        run_dir,
    )
    group = ProcessGroup(run.logs)  # the SuperLink is not ours: only `flwr run` is
    stop = StopFile(run.interrupt)
    stop.clear()
    following = threading.Event()
    with interrupts_to(stop, armed=following.is_set):
        try:
            link = (host, port, startup_timeout)
            log = run.logs / "flwr-run.log"
            submit = flwr_run_args(run_dir, app)
            restarted = lambda: _restarted(link, log, env, keys)  # noqa: E731
            submit_and_follow(group, run_dir, env, stop, following, restarted, submit)
        finally:
            group.stop()


def _restarted(
    link: tuple[str, int, float], log: Path, env: dict[str, str], keys: list[Path]
) -> bool:
    """After ``flwr run`` ended mid-run: the SuperLink's port is back (else False), the keys
    registered again (a SuperLink whose database was rebuilt has none) and the run it had
    stopped if it still has it (module docstring), so it may be resubmitted."""
    host, port, startup_timeout = link
    try:
        wait_for_port(host, port, startup_timeout)
    except TimeoutError:
        return False
    register_all(keys, env)
    _stop_submitted(tail(log, 10_000), env)
    return True


def _stop_submitted(log_text: str, env: dict[str, str]) -> None:
    """``flwr stop`` the run last submitted, if the SuperLink still has it (else nothing)."""
    ids = _STARTED.findall(log_text)
    if not ids:
        return
    try:
        flwr_cli(["stop", ids[-1], FEDERATION], env)
        LOGGER.warning("stopped Flower run %s before resubmitting", ids[-1])
    except RuntimeError as e:
        LOGGER.info("Flower run %s is not running on the SuperLink (%s)", ids[-1], str(e)[-200:])


def engine(run, cfg) -> None:
    """The ``superlink`` engine (``fl_server.engines``), ``configs/engine/superlink.yaml``."""
    e = cfg.engine
    run_on_superlink(
        run.path,
        address=str(e.address),
        root_ca=Path(str(e.root_ca)),
        keys_dir=Path(str(e.public_keys)),
        startup_timeout=float(e.startup_timeout),
        app=Path(str(e.app)) if str(e.app) else PROJECT_ROOT,
    )
