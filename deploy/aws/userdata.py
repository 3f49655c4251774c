"""The instances' boot script: one template (``userdata.sh``), rendered per role.

The containers start with the same arguments as in ``docker-compose.yml`` (the SuperLink's TLS
and node authentication, each SuperNode's TLS root, key and node config); only the addresses
differ: the SuperLink's fixed private IP instead of the compose service name, a client's claimed
key slot as its partition id. ``tests/deploy/test_aws.py`` compares the two and runs Debian's
``shellcheck`` on every rendering.
"""

from __future__ import annotations

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


def _continued(args: list[str]) -> str:
    """Arguments as the tail of a ``docker run`` line: one per line, double-quoted (the
    variables expand, the quotes inside stay literal)."""
    quoted = ['    "' + a.replace('"', '\\"') + '"' for a in args]
    return " \\\n".join(quoted)


def image_uri(ctx: Any, role: str) -> str:
    """The image a ``role`` instance pulls: the configured one, or the deployment's ECR
    repository at this fedyolo's version."""
    from importlib.metadata import version

    given = ctx.cfg.images[role]
    return str(given) if given else f"{ctx.ids[f'{role}-repo']}:{version('fedyolo')}"


def server_ip(ctx: Any) -> str:
    """The SuperLink's private address (its fixed network interface)."""
    ec2 = ctx.client("ec2")
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[ctx.ids["superlink"]])
    return eni["NetworkInterfaces"][0]["PrivateIpAddress"]


def render(ctx: Any, role: str) -> str:
    """The boot script of a ``role`` instance (``ctx``: ``deploy.aws.stack.Context``)."""
    return render_values(
        ctx.cfg,
        role,
        name=ctx.name,
        image=image_uri(ctx, role),
        server_ip=server_ip(ctx),
        interface=str(ctx.ids["superlink"]),
        state_url=f"s3://{ctx.bucket}/{str(ctx.cfg.state_prefix).strip('/')}",
    )


def render_values(
    cfg: Any, role: str, *, name: str, image: str, server_ip: str, interface: str, state_url: str
) -> str:
    """The boot script of a ``role`` instance from known values: the deployment's own (``render``)
    or CloudFormation's placeholders (``deploy.aws.cfn.compute``)."""
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
        "__STATE_URL__": state_url,
        "__SERVER_ARGS__": _continued(SERVER_ARGS),
        "__CLIENT_ARGS__": _continued(CLIENT_ARGS),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        if key not in ("__SERVER_ARGS__", "__CLIENT_ARGS__") and (
            '"' in value or "$" in value or "`" in value or "\\" in value
        ):
            raise ValueError(f"user data: {key.strip('_').lower()}={shlex.quote(value)} is unsafe")
        text = text.replace(key, value)
    return text
