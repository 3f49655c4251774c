"""Identity: one IAM role and instance profile per role, each with inline policies only.

No AWS-managed policy: ``AmazonSSMManagedInstanceCore`` allows ``ssm:GetParameter*`` on ``*``,
which would let a client read the CA key, the SuperLink key and every other client's key. Its
Session Manager part is spelled out instead (``SESSION_MANAGER``). A role reads SSM parameters
only under its own prefix ``/fedyolo/<name>/<role>/`` (``parameter_prefix``); the CLI writes the
SecureStrings there (CloudFormation cannot create SecureString parameters).

``*`` stays only where AWS offers no resource level: ``ecr:GetAuthorizationToken``,
``cloudwatch:PutMetricData`` (limited to fedyolo's namespace by a condition), and Session
Manager's ``ssmmessages:*`` / ``ec2messages:*`` channel actions.
"""

from __future__ import annotations

from typing import Any

from deploy.aws import TAG
from deploy.aws.cfn import ROLES, att, name, parameter_prefix, ref, sub, tags, title

NAMESPACE = "fedyolo"  # deploy.aws.cloudwatch's metrics
ARN = "arn:${AWS::Partition}"
ACCOUNT = "${AWS::Region}:${AWS::AccountId}"

# Session Manager (and Run Command) without AmazonSSMManagedInstanceCore's parameter reads
SESSION_MANAGER = [
    "ssmmessages:CreateControlChannel",
    "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
    "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage",
    "ec2messages:FailMessage",
    "ec2messages:GetEndpoint",
    "ec2messages:GetMessages",
    "ec2messages:SendReply",
]

TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}


def parameter_arn(cfg: Any, role: str, tail: str = "*") -> dict:
    return sub(f"{ARN}:ssm:{ACCOUNT}:parameter{parameter_prefix(cfg, role)}/{tail}")


def _common(cfg: Any, role: str) -> list[dict]:
    return [
        {
            "Sid": "PullOwnImage",
            "Effect": "Allow",
            "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
            "Resource": att(f"{title(role)}Repository", "Arn"),
        },
        {
            "Sid": "EcrLogin",  # no resource level
            "Effect": "Allow",
            "Action": ["ecr:GetAuthorizationToken"],
            "Resource": "*",
        },
        {
            "Sid": "WriteOwnLogs",
            "Effect": "Allow",
            # the awslogs driver and the CloudWatch agent (the boot log)
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            "Resource": sub(f"{ARN}:logs:{ACCOUNT}:log-group:/fedyolo/{name(cfg)}:*"),
        },
        {
            "Sid": "ReadOwnParameters",
            "Effect": "Allow",
            "Action": ["ssm:GetParameter", "ssm:GetParameters"],
            "Resource": parameter_arn(cfg, role),
        },
        {
            "Sid": "SessionManagerRegistration",
            "Effect": "Allow",
            "Action": ["ssm:UpdateInstanceInformation"],
            "Resource": sub(f"{ARN}:ec2:{ACCOUNT}:instance/*"),
        },
        {
            "Sid": "SessionManagerChannels",  # no resource level
            "Effect": "Allow",
            "Action": SESSION_MANAGER,
            "Resource": "*",
        },
    ]


DATA = "data"  # s3://<bucket>/data/slot-<i>/ per client slot, data/server/ for the server


def _read_prefix(sid: str, prefix: str) -> list[dict]:
    """Read-only on ``prefix`` of the state bucket: list it, get its objects."""
    return [
        {
            "Sid": f"List{sid}",
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": att("StateBucket", "Arn"),
            "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*"]}},
        },
        {
            "Sid": f"Read{sid}",
            "Effect": "Allow",
            "Action": ["s3:GetObject"],
            "Resource": sub(f"${{StateBucket.Arn}}/{prefix}*"),
        },
    ]


def _server(cfg: Any) -> list[dict]:
    prefix = str(cfg.state_prefix).strip("/")
    return _read_prefix("ServerData", f"{DATA}/server/") + [
        {
            "Sid": "ListState",
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": att("StateBucket", "Arn"),
            "Condition": {"StringLike": {"s3:prefix": [f"{prefix}/*"]}},
        },
        {  # deploy.aws.s3state: content-addressed objects, the manifest, old objects dropped
            "Sid": "State",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
            "Resource": sub(f"${{StateBucket.Arn}}/{prefix}/*"),
        },
        {
            "Sid": "Metrics",  # no resource level: fedyolo's namespace only
            "Effect": "Allow",
            "Action": ["cloudwatch:PutMetricData"],
            "Resource": "*",
            "Condition": {"StringEquals": {"cloudwatch:namespace": NAMESPACE}},
        },
        {  # the boot script waits for the fixed interface to be free (no resource level)
            "Sid": "SeeFixedInterface",
            "Effect": "Allow",
            "Action": ["ec2:DescribeNetworkInterfaces"],
            "Resource": "*",
        },
        {
            "Sid": "AttachFixedInterface",
            "Effect": "Allow",
            "Action": ["ec2:AttachNetworkInterface"],
            "Resource": [
                sub(f"{ARN}:ec2:{ACCOUNT}:network-interface/${{ServerInterface}}"),
                sub(f"{ARN}:ec2:{ACCOUNT}:instance/*"),
            ],
            "Condition": {"StringEquals": {f"aws:ResourceTag/{TAG}": name(cfg)}},
        },
    ]


def _client(cfg: Any) -> list[dict]:
    """A client claims its slot at boot, so it may read every slot's data (read-only): the
    boot script syncs only ``data/slot-<its slot>/``."""
    return _read_prefix("SlotData", f"{DATA}/slot-") + [
        {  # a client claims a key slot: a parameter it creates (user data)
            "Sid": "ClaimSlot",
            "Effect": "Allow",
            "Action": ["ssm:PutParameter", "ssm:DeleteParameter"],
            "Resource": parameter_arn(cfg, "client", "claims/*"),
        },
        {  # ...and takes over a slot whose holder is gone (no resource level)
            "Sid": "SeeClaimHolders",
            "Effect": "Allow",
            "Action": ["ec2:DescribeInstances"],
            "Resource": "*",
        },
    ]


def policy(cfg: Any, role: str) -> dict:
    """The role's one inline policy document."""
    extra = _server(cfg) if role == "server" else _client(cfg)
    return {"Version": "2012-10-17", "Statement": _common(cfg, role) + extra}


def roles(cfg: Any) -> dict:
    n, out = name(cfg), {}
    for role in ROLES:
        t = title(role)
        out[f"{t}Role"] = {
            "Type": "AWS::IAM::Role",
            "Properties": {
                "RoleName": f"{n}-{role}",
                "Description": f"fedyolo {n}: {role} instances",
                "AssumeRolePolicyDocument": TRUST,
                "Policies": [{"PolicyName": "fedyolo", "PolicyDocument": policy(cfg, role)}],
                "Tags": tags(cfg),
            },
        }
        out[f"{t}Profile"] = {
            "Type": "AWS::IAM::InstanceProfile",
            "Properties": {"InstanceProfileName": f"{n}-{role}", "Roles": [ref(f"{t}Role")]},
        }
    return out
