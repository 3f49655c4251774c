"""The AWS deployment as one CloudFormation template, generated from the settings
(``configs/deploy/aws.yaml`` + ``key=value``): ``fedyolo deploy aws template`` prints it.

``deploy.aws.stack`` deploys it as CloudFormation change sets (``plan``, ``up``, ``down``). The
resource families
live in ``deploy.aws.cfn``: network (VPC, security groups, the SuperLink's interface), iam
(roles with inline least-privilege policies), storage (state bucket, ECR, logs), compute
(launch templates, Auto Scaling groups) and alarms (SNS, alarms, dashboard, budget).

Not in the template, because CloudFormation cannot make them: the SecureString parameters (the
CA, the SuperLink's certificate and key, the client slots' keys, the state key). The CLI writes
them (``deploy.aws.secrets``) under ``/fedyolo/<name>/server/`` and ``/fedyolo/<name>/client/``,
the only prefixes each role may read.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from omegaconf import ListConfig

from deploy.aws import AwsError
from deploy.aws.cfn import alarms, compute, iam, network, storage

# CloudWatch Logs' allowed retention periods, in days
RETENTION_DAYS = (
    1,
    3,
    5,
    7,
    14,
    30,
    60,
    90,
    120,
    150,
    180,
    365,
    400,
    545,
    731,
    1096,
    1827,
    2192,
    2557,
    2922,
    3288,
    3653,
)


def _fail(key: str, value: Any, why: str) -> AwsError:
    return AwsError(f"deploy aws: {key}={value!r}: {why}")


def _cidr(key: str, value: Any) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(str(value), strict=True)
    except ValueError as e:
        raise _fail(key, value, f"not a CIDR block ({e}); e.g. 10.42.0.0/16") from None
    if net.version != 4:
        raise _fail(key, value, "an IPv4 CIDR block, e.g. 203.0.113.7/32")
    return net


def check(cfg: Any) -> None:
    """Settings the template depends on; a bad one is an ``AwsError`` naming its key."""
    if not cfg.vpc.id:
        vpc = _cidr("vpc.cidr", cfg.vpc.cidr)
        if vpc.prefixlen > 24 or 2 ** (24 - vpc.prefixlen) < len(cfg.vpc.zones):
            raise _fail("vpc.cidr", cfg.vpc.cidr, "too small for one /24 per zone in vpc.zones")
        if not cfg.vpc.zones:
            raise _fail("vpc.zones", list(cfg.vpc.zones), "at least one zone letter")
    elif not cfg.vpc.subnets:
        raise _fail("vpc.subnets", [], "list the subnet ids of vpc.id to use")
    for i, c in enumerate(cfg.operator_cidrs):
        if _cidr(f"operator_cidrs[{i}]", c).prefixlen == 0:
            raise _fail(f"operator_cidrs[{i}]", c, "opens the SuperLink to everyone; use SSM")
    if not 1 <= int(cfg.ports.fleet) <= 65535:
        raise _fail("ports.fleet", cfg.ports.fleet, "a TCP port, 1..65535")
    if compute.client_arch(cfg) not in compute.ARCHS:
        raise _fail("clients.arch", cfg.clients.arch, f"one of {', '.join(compute.ARCHS)}")
    if int(cfg.clients.max) < 1:
        raise _fail("clients.max", cfg.clients.max, "at least 1 (one client per key slot)")
    if cfg.alarms.email is not None and "@" not in str(cfg.alarms.email):
        raise _fail("alarms.email", cfg.alarms.email, "an email address, or null")
    usd = cfg.budget.monthly_usd
    if usd is not None and (not isinstance(usd, int | float) or usd <= 0):
        raise _fail("budget.monthly_usd", usd, "a positive number of US dollars, or null")
    if int(cfg.logs.retention_days) not in RETENTION_DAYS:
        raise _fail("logs.retention_days", cfg.logs.retention_days, f"one of {RETENTION_DAYS}")
    if int(cfg.ecr.keep_images) < 1:
        raise _fail("ecr.keep_images", cfg.ecr.keep_images, "at least 1")
    _check_private_ip(cfg)
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", str(cfg.run.name)):
        raise _fail("run.name", cfg.run.name, "lower-case letters, digits, '-' and '_', at most 40")
    overrides = cfg.run.overrides
    if not isinstance(overrides, list | tuple | ListConfig):
        raise _fail("run.overrides", overrides, "a list of key=value Hydra overrides")
    for i, o in enumerate(overrides):
        if "=" not in str(o) or "\n" in str(o):
            raise _fail(f"run.overrides[{i}]", o, "one key=value, e.g. federation.rounds=50")


def _check_private_ip(cfg: Any) -> None:
    """``server.private_ip``: an address AWS may give inside the interface's subnet (the first
    four and the last of a subnet are AWS's). In a VPC of yours EC2 checks it at ``up``."""
    ip = cfg.server.private_ip
    if ip is None:
        return
    try:
        addr = ipaddress.ip_address(str(ip))
    except ValueError:
        raise _fail("server.private_ip", ip, "an IPv4 address, or null (AWS picks)") from None
    subnet = network.first_subnet(cfg)
    if subnet is None:
        return
    hosts = list(subnet)
    if addr not in subnet:
        raise _fail("server.private_ip", ip, f"outside the server's subnet {subnet}")
    if addr in hosts[:4] or addr == hosts[-1]:
        raise _fail("server.private_ip", ip, f"reserved by AWS in {subnet} (first 4 and last)")


def template(cfg: Any, *, sized: bool = True) -> dict:
    """The whole deployment as a CloudFormation template (a dict, JSON-ready). ``sized=False``:
    both groups at 0 instances (no image to boot yet; ``deploy.aws.cfn.compute.sizes``)."""
    check(cfg)
    resources: dict[str, Any] = {}
    for part in (
        network.vpc,
        network.security_groups,
        network.server_interface,
        storage.bucket,
        storage.repositories,
        storage.log_group,
        iam.roles,
        compute.launch_templates,
        alarms.topic,
        alarms.alarms,
        alarms.budget,
    ):
        resources.update(part(cfg))
    resources.update(compute.groups(cfg, sized))
    outputs: dict[str, Any] = {}
    for family in (network, storage, compute, alarms):
        outputs.update(family.outputs(cfg))
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": f"fedyolo deployment {cfg.name}: a SuperLink and its clients on EC2",
        "Parameters": compute.parameters(cfg),
        "Resources": resources,
        "Outputs": outputs,
    }


def to_json(cfg: Any, *, sized: bool = True) -> str:
    return json.dumps(template(cfg, sized=sized), indent=1, sort_keys=False)
