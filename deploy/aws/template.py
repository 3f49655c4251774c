"""The AWS deployment as one CloudFormation template, generated from the settings
(``configs/deploy/aws.yaml`` + ``key=value``): ``fedyolo deploy aws template`` prints it.

WORK IN PROGRESS (issue 30): ``up``/``down``/``plan`` still create resource by resource
(``deploy.aws.stack``); they move to change sets of this template next. The resource families
live in ``deploy.aws.cfn``: network (VPC, security groups, the SuperLink's interface), iam
(roles with inline least-privilege policies), storage (state bucket, ECR, logs), compute
(launch templates, Auto Scaling groups) and alarms (SNS, alarms, dashboard, budget).

Not in the template, because CloudFormation cannot make them: the SecureString parameters (the
CA, the SuperLink's certificate and key, the client slots' keys, the state key). The CLI writes
them under ``/fedyolo/<name>/server/`` and ``/fedyolo/<name>/client/``, the only prefixes each
role may read.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

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


def template(cfg: Any) -> dict:
    """The whole deployment as a CloudFormation template (a dict, JSON-ready)."""
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
        compute.groups,
        alarms.topic,
        alarms.alarms,
        alarms.budget,
    ):
        resources.update(part(cfg))
    outputs: dict[str, Any] = {}
    for family in (network, storage, compute, alarms):
        outputs.update(family.outputs(cfg))
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": f"fedyolo deployment {cfg.name}: a SuperLink and its clients on EC2",
        "Parameters": {"Ami": compute.ami_parameter(cfg)},
        "Resources": resources,
        "Outputs": outputs,
    }


def to_json(cfg: Any) -> str:
    return json.dumps(template(cfg), indent=1, sort_keys=False)
