"""The instances' boot script: one template (``userdata.sh``), rendered per role.

The containers start with the same arguments as in ``docker-compose.yml`` (the SuperLink's TLS
and node authentication, each SuperNode's TLS root, key and node config); only the addresses
differ: the SuperLink's fixed private IP instead of the compose service name, a client's claimed
key slot as its partition id. ``tests/deploy/test_aws.py`` compares the two and runs Debian's
``shellcheck`` on every rendering.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("userdata.sh")

# docker-compose.yml's `superlink` command, verbatim
SERVER_ARGS = [
    "--host=0.0.0.0",
    "--port=9092",
    "--ssl-ca-certfile=/secrets/ca.crt",
    "--ssl-certfile=/secrets/superlink.crt",
    "--ssl-keyfile=/secrets/superlink.key",
    "--enable-supernode-auth",
    "--database=/state/superlink.db",
    "--disable-runtime-dependency-installation",
]

# docker-compose.yml's `supernode-<i>` command; the shell expands the variables
CLIENT_ARGS = [
    "--superlink=${SERVER_IP}:${FLEET_PORT}",
    "--root-certificates=/secrets/ca.crt",
    "--auth-supernode-private-key=/secrets/node.key",
    '--node-config=partition-id=${PARTITION_ID} num-partitions=${SLOTS} data-path="/data/data.yaml"'
    " warm-worker=true",
]


# the server's driver container (userdata.sh): `fedyolo run <fresh or resume=...>` then these,
# submitting to the SuperLink it shares a network with (deploy/superlink.py, engine=superlink)
DRIVER_ARGS = [
    "engine=superlink",
    "engine.address=127.0.0.1:${FLEET_PORT}",  # the published port, on the host's network
    "engine.root_ca=/secrets/ca.crt",
    "engine.public_keys=/keys",
    "engine.app=/opt/fedyolo/app",  # the Flower app flwr run packs (Dockerfile.server)
]
RUNS = "/var/lib/fedyolo/runs"  # the run directory's folder, the same in both server containers
SERVER_DATA = (
    "/var/lib/fedyolo/data/server"  # the held-out set, synced from s3://<bucket>/data/server/
)
UNSAFE = ('"', "$", "`", "\\", "\n", "\r", "'")


def _listed(args: list[str]) -> str:
    """Words of a bash array, one per line, each single-quoted (nothing in them expands)."""
    return "\n".join("      " + shlex.quote(a) for a in args)


def _continued(args: list[str]) -> str:
    """Arguments as the tail of a ``docker run`` line: one per line, double-quoted (the
    variables expand, the quotes inside stay literal)."""
    quoted = ['    "' + a.replace('"', '\\"') + '"' for a in args]
    return " \\\n".join(quoted)


def render_values(
    cfg: Any, role: str, *, name: str, image: str, server_ip: str, interface: str, state_url: str
) -> str:
    """The user data of a ``role`` instance from known values: the deployment's own (``render``)
    or CloudFormation's placeholders (``deploy.aws.cfn.compute``). A value that could end a
    quoted string or the boot script's here-document is refused in one line."""
    values = {
        "__NAME__": name,
        "__REGION__": str(cfg.region),
        "__ROLE__": role,
        "__IMAGE__": image,
        "__SERVER_IP__": server_ip,
        "__INTERFACE__": interface,
        "__FLEET_PORT__": str(int(cfg.ports.fleet)),
        "__SLOTS__": str(int(cfg.clients.max)),
        "__DATA_PATH__": str(cfg.clients.data_path),
        "__RUN_NAME__": run_name(cfg),
        "__STATE_URL__": state_url,
    }
    for key, value in values.items():
        if any(c in value for c in UNSAFE):
            raise ValueError(f"user data: {key.strip('_').lower()}={value!r} is unsafe")
    values |= {
        "__SERVER_ARGS__": _continued(SERVER_ARGS),
        "__CLIENT_ARGS__": _continued(CLIENT_ARGS),
        "__DRIVER_ARGS__": _continued(DRIVER_ARGS),
        "__RUN_ARGS__": _listed(run_args(cfg)),
    }
    text = _one_role(TEMPLATE.read_text(), role)
    for key, value in values.items():
        text = text.replace(key, value)
    return text


IF_SERVER = 'if [ "${ROLE}" = server ]; then\n'
ELSE_CLIENT = "else # @client: rendered for one role only (userdata.py)\n"
END = "fi # @end\n"


def _one_role(text: str, role: str) -> str:
    """The boot script's branch for ``role`` only: a launch template holds at most 16 KB of
    user data, and CloudFormation a template body of 51,200 bytes."""
    head, rest = text.split(IF_SERVER, 1)
    server, rest = rest.split(ELSE_CLIENT, 1)
    client, tail = rest.split(END, 1)
    if role == "server":
        return head + IF_SERVER + server + "fi\n" + tail
    return head + client + tail


def run_name(cfg: Any) -> str:
    """The federation's run name (``run.name``): a file name and an S3 key part."""
    value = str(cfg.get("run", {}).get("name") or "fleet")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError(f"user data: run.name={shlex.quote(value)}: letters, digits, . _ - only")
    return value


def run_args(cfg: Any) -> list[str]:
    """``fedyolo run``'s overrides of a fresh run on the server instance: the deployment's
    (its name, the slots, the held-out set the instance synced, the hooks that keep its state
    in S3 and its rounds in CloudWatch), then the user's ``run.overrides``."""
    user = [str(o) for o in (cfg.get("run", {}).get("overrides") or [])]
    for o in user:
        if "\n" in o or "\r" in o or "\0" in o:
            raise ValueError(f"user data: run.overrides: {o!r} spans lines")
    return [
        f"name={run_name(cfg)}",
        f"output.dir={RUNS}",
        "output.overwrite=true",  # only when S3 holds no copy: no round had finished
        f"data.cache_dir={RUNS}/.cache",
        f"federation.clients={int(cfg.clients.max)}",
        f"data.path={SERVER_DATA}/data.yaml",
        "data.partition=none",  # the clients bring their own data (their slot's shard)
        "hooks=[deploy.aws.s3state:StateSync,deploy.aws.cloudwatch:RoundMetrics]",
        *user,
    ]
