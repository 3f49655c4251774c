"""fedyolo on AWS: ``fedyolo deploy aws plan|up|push|status|scale|down|template``.

A SuperLink and the ServerApp on EC2 in an Auto Scaling group of one, the clients in an EC2
Auto Scaling group, TLS material and node keys in SSM Parameter Store, metrics and alarms in
CloudWatch, the server's state in S3: one CloudFormation stack (``deploy.aws.template``) deployed
with change sets (``deploy.aws.stack``), and the SecureStrings beside it (``deploy.aws.secrets``).
Every resource carries the tag ``fedyolo:deployment=<name>``. boto3 only; the tests run against
moto's HTTP server on 127.0.0.1.
"""

from __future__ import annotations

from deploy import DeployError

TAG = "fedyolo:deployment"


class AwsError(DeployError):
    """An AWS step that failed or cannot start; the message names the resource and why."""
