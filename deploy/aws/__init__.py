"""fedyolo on AWS: ``fedyolo deploy aws plan|up|status|scale|down`` (``deploy.aws.stack``).

A SuperLink and the ServerApp on EC2 in an Auto Scaling group of one, the clients in an EC2
Auto Scaling group, TLS material and node keys in SSM Parameter Store, metrics and alarms in
CloudWatch, the server's state in S3. Every resource carries the tag
``fedyolo:deployment=<name>``; ``down`` removes what carries it and then checks that nothing
does. boto3 only; the tests run against moto's HTTP server on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deploy import DeployError

TAG = "fedyolo:deployment"


class AwsError(DeployError):
    """An AWS step that failed or cannot start; the message names the resource and why."""


@dataclass
class Resource:
    """One AWS resource of a deployment: how to find, create and delete it (``ctx``:
    ``deploy.aws.stack.Context``). Here, not in ``stack``, so that ``cloudwatch`` declares its
    resources without importing ``stack``, which imports it."""

    kind: str
    name: str
    find: Callable[[Any], Any]
    create: Callable[[Any], Any]
    delete: Callable[[Any, Any], None]
    hourly: Callable[[Any], float] = lambda ctx: 0.0
    what: str = ""
