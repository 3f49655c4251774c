"""``fedyolo deploy aws rehearse``: the EC2 boot path, run on this machine before paying for EC2.

What runs as on AWS: the deployment's CloudFormation template, created by ``up``; the images,
pushed by ``push`` to a registry that speaks ECR's protocol (Debian's ``docker-registry``); the
clients' shards and the held-out set, uploaded by ``deploy aws data upload``; the user data of
each launch template, read back from the API as an instance receives it and run unchanged by
``bash``; every AWS call of the boot script (the AWS CLI), the SSM keys, the slot claims, the
interface hand-over, Docker containers as on an instance, the S3 state and the resume.

What stands in, and why:

* moto's server for AWS's APIs. It boots no instance: each instance of the groups becomes a
  *stand-in*, a folder (``FEDYOLO_ROOT``) with its own metadata endpoint (``FEDYOLO_IMDS``, which
  answers the instance id) running the user data. moto also keeps a terminated instance's
  network interface attached; EC2 detaches it, so the rehearsal does.
* ``dnf``, ``systemctl`` and the CloudWatch agent are shims: ``systemctl enable --now`` runs a
  unit's ``ExecStart`` with its ``Restart=on-failure`` and ``RestartSec``, as systemd would.
* Containers log to ``json-file``: the ``awslogs`` driver needs credentials in the Docker daemon.
* The server's fixed private address is this machine's address on a Docker network made for the
  rehearsal, so the clients' containers reach the SuperLink's published port there, and the
  certificate ``up`` made for that address is checked by the clients as on AWS.

The figures (seconds of each step, boot to the first round, replacement to the resumed round)
go to ``<out>/rehearsal.json`` beside the federation's ``summary.json`` fetched from S3.
"""

from __future__ import annotations

import base64
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
import warnings
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from typing import Any

from deploy.aws import AwsError
from fl_client.errors import ExitCode
from fl_server.engines import EventKind, RunDir, Status

LOGGER = logging.getLogger("fedyolo")

REGION = "eu-west-1"
RUN_NAME = "rehearsal"
# a federation small enough for two CPU clients in minutes (tests/testkit.py's tiny setup)
RUN_OVERRIDES = [
    "model=tiny",
    "train.imgsz=64",
    "train.batch=8",
    "train.eval_batch=16",
    "train.epochs=1",
    "federation.round_timeout=600",
]
SHIMS = {
    "dnf": '#!/bin/sh\necho "dnf (rehearsal): not installing $*"\n',
    "amazon-cloudwatch-agent-ctl": "#!/bin/sh\necho 'cloudwatch agent (rehearsal): not started'\n",
}


@dataclass
class Options:
    out: Path
    rounds: int = 4
    replace_after: int = 2  # destroy the server instance once this many rounds are done
    clients: int = 2
    images: int = 40  # synthetic images in the fleet
    timeout: float = 1500.0  # seconds for the whole federation
    keep: bool = False  # leave containers and folders for inspection
    settings: list[str] = field(default_factory=list)  # more deploy settings (key=value)


def aws_cli() -> str:
    """The AWS CLI the boot script calls (``make .venv-aws`` installs a pinned one)."""
    here = Path(__file__).resolve().parents[2] / ".venv-aws" / "bin" / "aws"
    for candidate in (os.environ.get("FEDYOLO_AWS_CLI"), str(here), shutil.which("aws")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise AwsError(
        "deploy aws rehearse: no AWS CLI (the boot script calls it): `make .venv-aws`, or set "
        "FEDYOLO_AWS_CLI"
    )


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- the instances' metadata endpoint ------------------------------------------------------------
class _Metadata(BaseHTTPRequestHandler):
    """IMDSv2 as the boot script uses it: ``/<instance id>/latest/api/token`` (PUT) and
    ``/<instance id>/latest/meta-data/instance-id``."""

    def _answer(self, body: str, code: int = 200) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):  # noqa: N802 - http.server's names
        instance, _, rest = self.path.lstrip("/").partition("/")
        self._answer("rehearsal-token" if rest == "latest/api/token" else "", 200)

    def do_GET(self):  # noqa: N802
        instance, _, rest = self.path.lstrip("/").partition("/")
        if rest == "latest/meta-data/instance-id" and self.headers.get("X-aws-ec2-metadata-token"):
            self._answer(instance)
        else:
            self._answer("not found", 404)

    def log_message(self, *args):  # quiet
        pass


@contextmanager
def _metadata_server(host: str):
    server = ThreadingHTTPServer((host, 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()


@contextmanager
def _leave_once():
    """The first Ctrl-C or SIGTERM raises ``KeyboardInterrupt``; later ones are ignored, so the
    clean-up it starts (stand-ins, stack, network) is not cut short."""

    def handler(signum: int, frame: object) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- moto, the registry, the network -------------------------------------------------------------
@contextmanager
def _moto(host: str):
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise AwsError(
            "deploy aws rehearse: moto's server is not installed (pip install 'fedyolo[rehearse]')"
        ) from e
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for name in ("botocore", "moto"):  # moto's placeholders for what it does not model: the
        logging.getLogger(name).setLevel(logging.ERROR)  # docstring says what stands in
    warnings.filterwarnings("ignore", category=UserWarning, module="moto")
    server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
    server.start()
    h, p = server.get_host_and_port()
    try:
        yield f"http://{h}:{p}"
    finally:
        server.stop()


@contextmanager
def _registry(folder: Path):
    binary = shutil.which("docker-registry")
    if binary is None:
        raise AwsError(
            "deploy aws rehearse: no docker-registry (Debian: apt install docker-registry); it "
            "stands in for ECR"
        )
    port = _free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
        f"{folder / 'data'}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    with open(folder / "registry.log", "ab") as log:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log)
    try:
        _wait_port("127.0.0.1", port, 30, "docker-registry")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_port(host: str, port: int, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise AwsError(f"deploy aws rehearse: {what} did not listen on {host}:{port}")


OWNER_LABEL = "fedyolo.rehearsal.owner"  # "<boot id>:<pid>" of the rehearsal that made it


def _owner() -> str:
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{boot.read_text().strip() if boot.exists() else '?'}:{os.getpid()}"


def _alive(owner: str) -> bool:
    """Whether the rehearsal process ``owner`` names (``boot id:pid``) still runs."""
    boot, _, pid = owner.rpartition(":")
    if boot and boot != _owner().rpartition(":")[0]:
        return False  # made before this machine's last boot
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _clear_stale(client: Any) -> None:
    """Remove what a rehearsal that was killed (SIGKILL, a machine's end) left: its network and
    the containers still attached to it. Another live rehearsal's are left alone."""
    import docker

    for net in client.networks.list(names=["rehearsal-"]):
        owner = (net.attrs.get("Labels") or {}).get(OWNER_LABEL)
        if owner is None:  # made before the label: the name holds the pid
            suffix = net.name.removeprefix("rehearsal-")
            if not net.name.startswith("rehearsal-") or not suffix.isdigit():
                continue
            owner = f":{suffix}"
        if _alive(owner):
            continue
        LOGGER.warning("rehearsal: removing %s, left by a rehearsal that was killed", net.name)
        with suppress(docker.errors.APIError):
            net.reload()
            for c in net.containers:
                c.remove(force=True)
            net.remove()


@dataclass(frozen=True)
class Addresses:
    """The rehearsal's addresses: a /24 Docker network, the VPC's first subnet, whose gateway
    (this machine) holds the server interface's private address."""

    network: str
    server_ip: str
    vpc_cidr: str


def _addresses(client: Any) -> Addresses:
    """The first 10.N.0.0/24 (N from 213) no Docker network and no interface of this machine
    uses."""
    import ipaddress

    import psutil

    taken = [
        ipaddress.ip_network(pool["Subnet"], strict=False)
        for net in client.networks.list()
        for pool in ((net.attrs.get("IPAM") or {}).get("Config") or [])
        if pool.get("Subnet")
    ]
    taken += [
        ipaddress.ip_interface(f"{a.address}/{a.netmask}").network
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and a.netmask
    ]
    for n in range(213, 255):
        net = ipaddress.ip_network(f"10.{n}.0.0/24")
        if not any(net.overlaps(t) for t in taken):
            return Addresses(str(net), f"10.{n}.0.10", f"10.{n}.0.0/16")
    raise AwsError(
        "deploy aws rehearse: no free 10.N.0.0/24 (N 213-254) for the rehearsal's Docker network: "
        "`docker network ls` shows what holds them"
    )


@contextmanager
def _network(client: Any, name: str):
    """A Docker network whose gateway (this machine) holds the server interface's address;
    removed at the end with whatever is still attached to it."""
    import docker

    _clear_stale(client)
    where = _addresses(client)
    ipam = docker.types.IPAMConfig(
        pool_configs=[docker.types.IPAMPool(subnet=where.network, gateway=where.server_ip)]
    )
    try:
        net = client.networks.create(
            name, driver="bridge", ipam=ipam, labels={OWNER_LABEL: _owner()}
        )
    except docker.errors.APIError as e:
        raise AwsError(
            f"deploy aws rehearse: cannot make the Docker network {where.network} (gateway "
            f"{where.server_ip}) the stand-in server address needs: {e.explanation or e}"
        ) from e
    try:
        yield where
    finally:
        try:
            net.reload()
            for c in net.containers:
                c.remove(force=True)
            net.remove()
        except docker.errors.APIError as e:
            LOGGER.warning("rehearsal clean-up: network %s: %s", name, e.explanation or e)


def _untag(client: Any, registry: str) -> None:
    """The rehearsal's registry tags (``<registry>/fedyolo/...``) off the local images."""
    import docker

    for image in client.images.list():
        for ref in image.tags:
            if ref.startswith(f"{registry}/"):
                with suppress(docker.errors.APIError):
                    client.images.remove(ref, noprune=True)


# -- stand-in instances --------------------------------------------------------------------------
SYSTEMCTL = Path(__file__).with_name("systemctl-shim")  # systemd's part, for a stand-in


@dataclass
class StandIn:
    """One instance of a group: its user data run by ``bash`` in a folder of its own."""

    instance_id: str
    role: str
    root: Path
    proc: subprocess.Popen | None = None
    booted_at: float = 0.0

    def boot(self, user_data: str, env: dict[str, str], docker_cli: str) -> None:
        (self.root / "var/lib/cloud").mkdir(parents=True, exist_ok=True)
        script = self.root / "var/lib/cloud/user-data"
        script.write_text(user_data)
        self.docker_cli = docker_cli
        self.booted_at = time.monotonic()
        with open(self.root / "cloud-init-output.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["bash", str(script)],
                env={**env, "FEDYOLO_ROOT": str(self.root)},
                stdout=log,
                stderr=log,
                start_new_session=True,  # the instance: its processes die with it
            )

    def containers(self) -> list[str]:
        out = subprocess.run(
            [self.docker_cli, "ps", "-aq", "--filter", f"name={self.instance_id}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        return out

    def destroy(self) -> None:
        """The instance is gone: its processes, its containers."""
        if self.proc is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        ids = self.containers()
        if ids:
            subprocess.run([self.docker_cli, "rm", "-f", *ids], capture_output=True, check=False)

    def boot_log(self, lines: int = 20) -> str:
        path = self.root / "var/log/fedyolo-boot.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        init = self.root / "cloud-init-output.log"
        text = (init.read_text(errors="replace") if init.exists() else "") + text
        return "\n".join(text.splitlines()[-lines:])


def _shims(folder: Path, aws: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    systemctl = f'#!/bin/sh\nexec {sys.executable} {SYSTEMCTL} "$@"\n'
    for name, text in {**SHIMS, "systemctl": systemctl}.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    link = folder / "aws"
    link.unlink(missing_ok=True)
    link.symlink_to(aws)
    return folder


# -- the AWS side, through the deployment's own verbs --------------------------------------------
def _resources(sess: Any, stack_name: str) -> dict[str, str]:
    cf = sess.client("cloudformation")
    rows = cf.describe_stack_resources(StackName=stack_name)["StackResources"]
    return {
        r["LogicalResourceId"]: r.get("PhysicalResourceId")
        for r in rows
        if "LogicalResourceId" in r
    }


def _user_data(sess: Any, template_id: str) -> str:
    got = sess.client("ec2").describe_launch_template_versions(
        LaunchTemplateId=template_id, Versions=["$Latest"]
    )
    return base64.b64decode(
        got["LaunchTemplateVersions"][0]["LaunchTemplateData"]["UserData"]
    ).decode()


def _instances(sess: Any, group: str) -> list[str]:
    got = sess.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[group])
    return [i["InstanceId"] for i in got["AutoScalingGroups"][0]["Instances"]]


def _terminate(sess: Any, instance_id: str, interface: str) -> None:
    """What EC2 does when an instance of a group dies: the group replaces it, and its network
    interfaces are detached (moto leaves them attached: done here)."""
    sess.client("autoscaling").terminate_instance_in_auto_scaling_group(
        InstanceId=instance_id, ShouldDecrementDesiredCapacity=False
    )
    ec2 = sess.client("ec2")
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[interface])["NetworkInterfaces"][0]
    attachment = eni.get("Attachment") or {}
    if attachment.get("InstanceId") == instance_id:
        ec2.detach_network_interface(AttachmentId=attachment["AttachmentId"], Force=True)


def _fleet_data(out: Path, clients: int, images: int) -> Path:
    """A synthetic fleet partitioned for ``clients`` slots (``fedyolo data synth`` and
    ``partition``, as a user would)."""
    fleet, parts = out / "fleet", out / "partition"
    cli = [sys.executable, "-m", "fl_server.cli", "data"]
    for args in (
        ["synth", str(fleet), "--images", str(images), "--imgsz", "64", "--domains", "day,night"],
        ["partition", str(fleet / "data.yaml"), str(parts), "--clients", str(clients)],
    ):
        done = subprocess.run([*cli, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise AwsError(f"deploy aws rehearse: fedyolo data {args[0]}: {done.stderr[-500:]}")
    return parts


# -- following the federation --------------------------------------------------------------------
def _run_dir(server: StandIn) -> RunDir:
    return RunDir(server.root / "var/lib/fedyolo/runs" / RUN_NAME)


def _wait(what: str, done, timeout: float, standins: list[StandIn], every: float = 1.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if done():
            return time.monotonic() - start
        time.sleep(every)
    logs = "\n".join(f"--- {s.role} {s.instance_id}:\n{s.boot_log()}" for s in standins)
    raise AwsError(f"deploy aws rehearse: {what} did not happen in {timeout:.0f} s\n{logs}")


def _rounds(run: RunDir) -> int:
    try:
        return max((int(r["round"]) for r in run.rounds()), default=0)
    except (OSError, ValueError, KeyError):
        return 0


def _resumed(run: RunDir) -> bool:
    try:
        return any(e["kind"] == EventKind.RESUME for e in run.read_events())
    except (OSError, ValueError):
        return False


def _ended(run: RunDir) -> str | None:
    try:
        summary = run.read_summary()
    except (OSError, ValueError):
        return None
    status = (summary or {}).get("status")
    return None if status in (None, Status.RUNNING) else status


# -- the rehearsal -------------------------------------------------------------------------------
def rehearse(opts: Options) -> dict:
    """Run the boot path end to end; returns (and writes) ``rehearsal.json``."""
    import boto3
    import docker

    from deploy.aws import data, ecr, s3state, stack
    from deploy.images import default_tag

    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}
    client = docker.from_env()
    cli = shutil.which("docker") or "docker"
    tag = f"rehearsal-{os.getpid()}"
    standins: list[StandIn] = []
    began = time.monotonic()

    def timed(name: str, fn, *a, **k):
        t = time.monotonic()
        result = fn(*a, **k)
        steps[name] = round(time.monotonic() - t, 1)
        LOGGER.info("rehearsal: %s in %.1f s", name, steps[name])
        return result

    with ExitStack() as stack_:
        # Ctrl-C or SIGTERM: leave at once, through the clean-up below (stand-ins, stack, network)
        stack_.enter_context(_leave_once())
        where = stack_.enter_context(_network(client, tag))
        endpoint = stack_.enter_context(_moto(where.server_ip))
        imds = stack_.enter_context(_metadata_server(where.server_ip))
        registry = stack_.enter_context(_registry(out / "registry"))
        stack_.callback(_untag, client, registry)
        creds = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "rehearsal",
            "AWS_SECRET_ACCESS_KEY": "rehearsal",
            "AWS_DEFAULT_REGION": REGION,
        }
        saved = {k: os.environ.get(k) for k in creds}
        os.environ.update(creds)
        stack_.callback(_restore, saved)
        sess = boto3.session.Session(region_name=REGION)
        fleet_port = _free_port("0.0.0.0")
        ver = version("fedyolo")
        overrides = [
            f"name={tag}",
            f"region={REGION}",
            f"vpc.cidr={where.vpc_cidr}",
            f"server.private_ip={where.server_ip}",
            f"images.server={registry}/fedyolo/server:{ver}",
            f"images.client={registry}/fedyolo/client:{ver}",
            f"clients.min={opts.clients}",
            f"clients.desired={opts.clients}",
            f"clients.max={opts.clients}",
            "clients.spot=false",
            f"ports.fleet={fleet_port}",
            f"run.name={RUN_NAME}",
            "run.overrides=["
            + ",".join(repr(o) for o in [*RUN_OVERRIDES, f"federation.rounds={opts.rounds}"])
            + "]",
            *opts.settings,
        ]
        cfg = stack.load_settings(overrides)
        timed("stack_up", stack.up, cfg, sess)
        if not opts.keep:
            stack_.callback(_quiet, stack.down, cfg, sess)
        # the groups are sized already (images.* given): no instance refresh (moto has none)
        local = {r: default_tag(r) for r in ("server", "client")}
        timed("images_push", ecr.push, cfg, sess, local, release=False)
        parts = timed("data_prepare", _fleet_data, out, opts.clients, opts.images)
        timed("data_upload", data.upload, cfg, parts)

        res = _resources(sess, stack.stack_name(cfg))
        user_data = {
            r: _user_data(sess, res[f"{r.title()}LaunchTemplate"]) for r in ("server", "client")
        }
        (out / "user-data").mkdir(exist_ok=True)
        for role, text in user_data.items():
            (out / "user-data" / f"{role}.sh").write_text(text)
        shims = _shims(out / "shims", aws_cli())
        env = {
            **os.environ,
            "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}",
            "FEDYOLO_LOG_DRIVER": "json-file",
            "DOCKER_CONFIG": str(out / "docker-config"),
        }

        def boot(role: str, instance_id: str) -> StandIn:
            s = StandIn(instance_id, role, out / "instances" / instance_id)
            s.boot(user_data[role], {**env, "FEDYOLO_IMDS": f"{imds}/{instance_id}"}, cli)
            standins.append(s)
            if not opts.keep:
                stack_.callback(s.destroy)
            return s

        t0 = time.monotonic()
        server = boot("server", _instances(sess, res["ServerGroup"])[0])
        clients = [boot("client", i) for i in _instances(sess, res["ClientGroup"])]
        _wait("the first round", lambda: _rounds(_run_dir(server)) >= 1, opts.timeout, standins)
        steps["boot_to_first_round"] = round(time.monotonic() - t0, 1)
        fetched = out / "fetched"
        url = f"s3://{stack.bucket_name(cfg, sess)}/{str(cfg.state_prefix).strip('/')}/{RUN_NAME}"
        os.environ.setdefault(s3state.ENV_KEY_PARAMETER, f"/fedyolo/{tag}/server/state/key")

        def in_s3(rounds: int = 0, ended: bool = False) -> bool:
            """The server's copy in S3 holds ``rounds`` (and, if asked, the run's end)."""
            shutil.rmtree(fetched, ignore_errors=True)
            try:
                s3state.fetch(url, fetched)
            except s3state.SyncError:
                return False  # no copy yet
            copy = RunDir(fetched)
            return _rounds(copy) >= rounds and (not ended or _ended(copy) is not None)

        # destroyed once its copy in S3 holds the rounds (a kill before that loses the round in
        # flight, which the replacement runs again: not what this step shows)
        _wait(
            f"round {opts.replace_after} in S3",
            lambda: in_s3(opts.replace_after),
            opts.timeout,
            standins,
            every=3.0,
        )
        done_before = _rounds(RunDir(fetched))  # what the replacement will resume from
        LOGGER.info("rehearsal: destroying the server instance %s", server.instance_id)
        server.destroy()
        _terminate(sess, server.instance_id, res["ServerInterface"])
        replacement_id = next(
            i for i in _instances(sess, res["ServerGroup"]) if i != server.instance_id
        )
        replacement = boot("server", replacement_id)
        run = _run_dir(replacement)
        steps["replacement_to_resumed_round"] = round(
            _wait(
                "a resumed round on the replacement server",
                lambda: _resumed(run) and _rounds(run) > done_before,
                opts.timeout,
                standins,
            ),
            1,
        )
        _wait("the run's end", lambda: _ended(run) is not None, opts.timeout, standins)
        _wait("the run's end in S3", lambda: in_s3(ended=True), 120, standins, 3.0)
        summary = RunDir(fetched).read_summary() or {}
        shutil.copy2(RunDir(fetched).summary, out / "summary.json")
        result = {
            "status": summary.get("status"),
            "rounds": _rounds(RunDir(fetched)),
            "rounds_configured": opts.rounds,
            "client_instances": len(clients),
            "server_instances": 2,
            "server_replacements": 1,
            "replaced_after_round": done_before,
            "resumed_from_s3": _resumed(RunDir(fetched)),
            "operator_actions": 0,
            "seconds": {**steps, "total": round(time.monotonic() - began, 1)},
            "state_url": url,
            "stand_ins": "user data run by bash, a folder per instance (deploy/aws/rehearse.py)",
        }
        (out / "rehearsal.json").write_text(json.dumps(result, indent=2) + "\n")
        if result["status"] != Status.COMPLETED or not result["resumed_from_s3"]:
            raise AwsError(
                f"deploy aws rehearse: the federation ended {result['status']!r} "
                f"(resumed from S3: {result['resumed_from_s3']}); see {out}"
            )
        return result


OPTION_KEYS = {"out", "rounds", "replace_after", "clients", "images", "timeout", "keep"}


def command(items: list[str]) -> ExitCode:
    """``fedyolo deploy aws rehearse [out=DIR] [rounds=N] [replace_after=K] [clients=C]
    [keep=true] [deploy setting=value ...]``: prints rehearsal.json."""
    opts = Options(out=Path("runs/rehearsal"))
    settings = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise AwsError(f"deploy aws rehearse: {item!r}: give key=value")
        if key not in OPTION_KEYS:
            settings.append(item)
        elif key == "out":
            opts.out = Path(value).expanduser()
        elif key == "keep":
            opts.keep = value.lower() in ("1", "true", "yes")
        else:
            try:
                setattr(opts, key, float(value) if key == "timeout" else int(value))
            except ValueError as e:
                raise AwsError(f"deploy aws rehearse: {key}={value!r}: a number") from e
    if not 1 <= opts.replace_after < opts.rounds or opts.clients < 1:
        raise AwsError(
            "deploy aws rehearse: need 1 <= replace_after < rounds and clients >= 1, got "
            f"replace_after={opts.replace_after} rounds={opts.rounds} clients={opts.clients}"
        )
    opts.settings = settings
    print(json.dumps(rehearse(opts), indent=2))
    return ExitCode.OK


def _restore(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - clean-up after the rehearsal: logged, never raised
        LOGGER.warning("rehearsal clean-up: %s", e)


__all__ = ["Options", "StandIn", "command", "rehearse"]
