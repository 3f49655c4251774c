"""The AWS deployment as an ordered list of resources: one definition serves plan, up and down.

Each :class:`Resource` knows how to find itself (by its name, which starts with the deployment
name, or by the ``fedyolo:deployment`` tag), create itself, and delete itself. ``up`` walks the
list in order and creates what it does not find, so a second ``up`` changes nothing and an ``up``
that failed half-way converges when run again. Every resource is named and tagged *in the call
that creates it*, so whatever an interrupted ``up`` left, ``down`` finds. ``down`` walks the list
backwards, deletes what it finds, and then looks again: one line per leftover, exit 1.

What is created (``plan`` prints it with an hourly estimate):

* S3 bucket for the server's state (versioned, encrypted, public access blocked), a CloudWatch
  Logs group, ECR repositories for the two images;
* a VPC with an internet gateway, public subnets and a route table (or the VPC you name);
* security groups: the clients' (no ingress), the server's (the Fleet port from the clients'
  group only, the control port from ``operator_cidrs`` only; no SSH);
* a network interface for the server: a fixed private IP that a replacement instance attaches,
  so the SuperLink's certificate and the clients' address survive the instance;
* SSM parameters (SecureString): the CA, the SuperLink's certificate and key, one private key per
  client slot; never in user data;
* per role an IAM role and instance profile with least privilege (no ``*`` action, no ``*``
  resource except where AWS offers none: ``ecr:GetAuthorizationToken``,
  ``cloudwatch:PutMetricData`` limited by namespace) and SSM Session Manager;
* launch templates (IMDSv2 required, encrypted gp3 root volume, user data from one template);
* the server's Auto Scaling group of one and the clients' (spot above an on-demand base), a
  step scaling policy on the federation's own metric, CloudWatch alarms and a dashboard.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.aws import TAG, AwsError, Resource
from deploy.aws.userdata import image_uri, server_ip  # noqa: F401 - stack.image_uri for ecr

LOGGER = logging.getLogger("fedyolo")

CONFIG = Path(__file__).resolve().parent.parent.parent / "configs" / "deploy" / "aws.yaml"
NAMESPACE = "fedyolo"  # CloudWatch namespace of the server's metrics (deploy.aws.cloudwatch)
ROLES = ("server", "client")


def load_settings(overrides=()) -> Any:
    from deploy import settings

    cfg = settings.load(CONFIG, overrides, "deploy aws", AwsError)
    c = cfg.clients
    if c.max < 1:
        raise AwsError(f"deploy aws: clients.max={c.max}: at least 1 (one client per key slot)")
    if not (0 <= c.min <= c.desired <= c.max) or c.max < 1:
        raise AwsError(
            f"deploy aws: clients need 0 <= min <= desired <= max, max >= 1; got "
            f"{c.min}/{c.desired}/{c.max}"
        )
    if not 0 <= c.on_demand_base <= c.max:
        raise AwsError(f"deploy aws: clients.on_demand_base={c.on_demand_base} not in 0..max")
    if not str(cfg.name).replace("-", "").isalnum() or len(str(cfg.name)) > 24:
        raise AwsError(f"deploy aws: name={cfg.name!r}: letters, digits and '-', at most 24")
    from deploy.aws.template import check  # CIDRs, alarms, budget, logs: one line naming the key

    check(cfg)
    return cfg


@dataclass
class Context:
    """boto3 clients and what ``up`` learnt so far (ids by resource name)."""

    cfg: Any
    session: Any
    ids: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str):
        return self.session.client(service, region_name=str(self.cfg.region))

    @property
    def name(self) -> str:
        return str(self.cfg.name)

    def tags(self, **extra: str) -> list[dict[str, str]]:
        return [{"Key": TAG, "Value": self.name}] + [
            {"Key": k, "Value": v} for k, v in extra.items()
        ]

    def tag_spec(self, resource_type: str, name: str) -> list[dict]:
        return [{"ResourceType": resource_type, "Tags": self.tags(Name=name)}]

    def tagged(self) -> list[dict]:
        return [{"Name": f"tag:{TAG}", "Values": [self.name]}]

    @property
    def account(self) -> str:
        if "account" not in self.ids:
            self.ids["account"] = self.client("sts").get_caller_identity()["Account"]
        return self.ids["account"]

    @property
    def bucket(self) -> str:
        return f"{self.name}-state-{self.account}-{self.cfg.region}".lower()


def _code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


def _none_if_missing(call: Callable[[], Any], *codes: str) -> Any:
    from botocore.exceptions import ClientError

    try:
        return call()
    except ClientError as e:
        if any(c in _code(e) for c in codes or ("NotFound", "NoSuch")):
            return None
        raise


# -- storage and registries ----------------------------------------------------------------
def _bucket() -> Resource:
    def find(ctx):
        s3 = ctx.client("s3")
        return _none_if_missing(lambda: s3.head_bucket(Bucket=ctx.bucket) and ctx.bucket, "404")

    def create(ctx):
        s3 = ctx.client("s3")
        kw = {}
        if str(ctx.cfg.region) != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": str(ctx.cfg.region)}
        s3.create_bucket(Bucket=ctx.bucket, **kw)
        s3.put_bucket_tagging(Bucket=ctx.bucket, Tagging={"TagSet": ctx.tags()})
        s3.put_public_access_block(
            Bucket=ctx.bucket,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )
        s3.put_bucket_encryption(
            Bucket=ctx.bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        )
        s3.put_bucket_versioning(Bucket=ctx.bucket, VersioningConfiguration={"Status": "Enabled"})
        # versions replaced or dropped by the server's sync (deploy.aws.s3state) go after a week
        s3.put_bucket_lifecycle_configuration(
            Bucket=ctx.bucket,
            LifecycleConfiguration={
                "Rules": [
                    {
                        "ID": "fedyolo-old-versions",
                        "Status": "Enabled",
                        "Filter": {"Prefix": ""},
                        "NoncurrentVersionExpiration": {"NoncurrentDays": 7},
                        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                    }
                ]
            },
        )
        return ctx.bucket

    def delete(ctx, bucket):
        s3 = ctx.client("s3")
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            objs = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            if objs:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": objs})
        s3.delete_bucket(Bucket=bucket)

    return Resource("s3-bucket", "state", find, create, delete, what="the server's state")


def _log_group() -> Resource:
    def name(ctx):
        return f"/fedyolo/{ctx.name}"

    def find(ctx):
        got = ctx.client("logs").describe_log_groups(logGroupNamePrefix=name(ctx))["logGroups"]
        return next((g["logGroupName"] for g in got if g["logGroupName"] == name(ctx)), None)

    def create(ctx):
        logs = ctx.client("logs")
        logs.create_log_group(logGroupName=name(ctx), tags={TAG: ctx.name})
        logs.put_retention_policy(logGroupName=name(ctx), retentionInDays=30)
        return name(ctx)

    def delete(ctx, group):
        ctx.client("logs").delete_log_group(logGroupName=group)

    return Resource("log-group", "logs", find, create, delete, what="containers' logs (awslogs)")


def _repository(role: str) -> Resource:
    def name(ctx):
        return f"{ctx.name}/{role}"

    def find(ctx):
        ecr = ctx.client("ecr")
        got = _none_if_missing(lambda: ecr.describe_repositories(repositoryNames=[name(ctx)]))
        return got["repositories"][0]["repositoryUri"] if got else None

    def create(ctx):
        r = ctx.client("ecr").create_repository(
            repositoryName=name(ctx),
            tags=ctx.tags(),
            imageTagMutability="IMMUTABLE",
            imageScanningConfiguration={"scanOnPush": True},
            encryptionConfiguration={"encryptionType": "AES256"},
        )
        return r["repository"]["repositoryUri"]

    def delete(ctx, _uri):
        ctx.client("ecr").delete_repository(repositoryName=name(ctx), force=True)

    return Resource(
        "ecr-repository", f"{role}-repo", find, create, delete, what=f"the {role} image"
    )


# -- network -------------------------------------------------------------------------------
def _by_tag(ctx, describe: str, key: str, name: str, id_key: str, **kw) -> str | None:
    filters = [*ctx.tagged(), {"Name": "tag:Name", "Values": [name]}]
    got = getattr(ctx.client("ec2"), describe)(Filters=filters, **kw)[key]
    return got[0][id_key] if got else None


def _vpc() -> Resource:
    def find(ctx):
        if ctx.cfg.vpc.id:
            return str(ctx.cfg.vpc.id)
        return _by_tag(ctx, "describe_vpcs", "Vpcs", f"{ctx.name}-vpc", "VpcId")

    def create(ctx):
        ec2 = ctx.client("ec2")
        vpc = ec2.create_vpc(
            CidrBlock=str(ctx.cfg.vpc.cidr),
            TagSpecifications=ctx.tag_spec("vpc", f"{ctx.name}-vpc"),
        )["Vpc"]["VpcId"]
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
        return vpc

    def delete(ctx, vpc):
        if not ctx.cfg.vpc.id:  # never a VPC we did not create
            ctx.client("ec2").delete_vpc(VpcId=vpc)

    return Resource("vpc", "vpc", find, create, delete)


def _gateway() -> Resource:
    def find(ctx):
        if ctx.cfg.vpc.id:
            return "reused"
        return _by_tag(
            ctx,
            "describe_internet_gateways",
            "InternetGateways",
            f"{ctx.name}-igw",
            "InternetGatewayId",
        )

    def create(ctx):
        ec2 = ctx.client("ec2")
        igw = ec2.create_internet_gateway(
            TagSpecifications=ctx.tag_spec("internet-gateway", f"{ctx.name}-igw")
        )["InternetGateway"]["InternetGatewayId"]
        ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=ctx.ids["vpc"])
        return igw

    def delete(ctx, igw):
        if igw == "reused":
            return
        ec2 = ctx.client("ec2")
        got = ec2.describe_internet_gateways(InternetGatewayIds=[igw])["InternetGateways"]
        for a in got[0].get("Attachments", []) if got else []:
            ec2.detach_internet_gateway(InternetGatewayId=igw, VpcId=a["VpcId"])
        ec2.delete_internet_gateway(InternetGatewayId=igw)

    return Resource("internet-gateway", "igw", find, create, delete)


def _subnet(i: int) -> Resource:
    def find(ctx):
        if ctx.cfg.vpc.id:
            subnets = list(ctx.cfg.vpc.subnets)
            if i >= len(subnets):
                return "none"
            return str(subnets[i])
        return _by_tag(ctx, "describe_subnets", "Subnets", f"{ctx.name}-subnet-{i}", "SubnetId")

    def create(ctx):
        ec2 = ctx.client("ec2")
        base = str(ctx.cfg.vpc.cidr).split(".")
        sub = ec2.create_subnet(
            VpcId=ctx.ids["vpc"],
            CidrBlock=f"{base[0]}.{base[1]}.{i}.0/24",
            AvailabilityZone=f"{ctx.cfg.region}{ctx.cfg.vpc.zones[i]}",
            TagSpecifications=ctx.tag_spec("subnet", f"{ctx.name}-subnet-{i}"),
        )["Subnet"]["SubnetId"]
        ec2.modify_subnet_attribute(SubnetId=sub, MapPublicIpOnLaunch={"Value": True})
        return sub

    def delete(ctx, sub):
        if not ctx.cfg.vpc.id and sub != "none":
            ctx.client("ec2").delete_subnet(SubnetId=sub)

    return Resource("subnet", f"subnet-{i}", find, create, delete)


def _route_table() -> Resource:
    def find(ctx):
        if ctx.cfg.vpc.id:
            return "reused"
        return _by_tag(
            ctx, "describe_route_tables", "RouteTables", f"{ctx.name}-rt", "RouteTableId"
        )

    def create(ctx):
        ec2 = ctx.client("ec2")
        rt = ec2.create_route_table(
            VpcId=ctx.ids["vpc"], TagSpecifications=ctx.tag_spec("route-table", f"{ctx.name}-rt")
        )["RouteTable"]["RouteTableId"]
        ec2.create_route(
            RouteTableId=rt, DestinationCidrBlock="0.0.0.0/0", GatewayId=ctx.ids["igw"]
        )
        for s in _subnets(ctx):
            ec2.associate_route_table(RouteTableId=rt, SubnetId=s)
        return rt

    def delete(ctx, rt):
        if rt == "reused":
            return
        ec2 = ctx.client("ec2")
        got = ec2.describe_route_tables(RouteTableIds=[rt])["RouteTables"]
        for a in got[0].get("Associations", []) if got else []:
            if not a.get("Main"):
                ec2.disassociate_route_table(AssociationId=a["RouteTableAssociationId"])
        ec2.delete_route_table(RouteTableId=rt)

    return Resource("route-table", "rt", find, create, delete)


def _subnets(ctx) -> list[str]:
    return [v for k, v in sorted(ctx.ids.items()) if k.startswith("subnet-") and v != "none"]


def _security_group(role: str) -> Resource:
    gname = {"server": "server-sg", "client": "clients-sg"}[role]

    def find(ctx):
        ec2 = ctx.client("ec2")
        got = ec2.describe_security_groups(
            Filters=[*ctx.tagged(), {"Name": "group-name", "Values": [f"{ctx.name}-{gname}"]}]
        )["SecurityGroups"]
        return got[0]["GroupId"] if got else None

    def create(ctx):
        ec2 = ctx.client("ec2")
        sg = ec2.create_security_group(
            GroupName=f"{ctx.name}-{gname}",
            Description=f"fedyolo {ctx.name}: {role}",
            VpcId=ctx.ids["vpc"],
            TagSpecifications=ctx.tag_spec("security-group", f"{ctx.name}-{gname}"),
        )["GroupId"]
        if role == "server":
            perms = [
                {  # the SuperNodes' Fleet API: from the clients' group only
                    "IpProtocol": "tcp",
                    "FromPort": int(ctx.cfg.ports.fleet),
                    "ToPort": int(ctx.cfg.ports.fleet),
                    "UserIdGroupPairs": [{"GroupId": ctx.ids["clients-sg"]}],
                }
            ]
            if ctx.cfg.operator_cidrs:  # the flwr CLI's Control API: operators only
                perms.append(
                    {
                        "IpProtocol": "tcp",
                        "FromPort": int(ctx.cfg.ports.control),
                        "ToPort": int(ctx.cfg.ports.control),
                        "IpRanges": [
                            {"CidrIp": str(c), "Description": "operator"}
                            for c in ctx.cfg.operator_cidrs
                        ],
                    }
                )
            ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=perms)
        return sg

    def delete(ctx, sg):
        ctx.client("ec2").delete_security_group(GroupId=sg)

    return Resource("security-group", gname, find, create, delete)


def _server_interface() -> Resource:
    def find(ctx):
        ec2 = ctx.client("ec2")
        got = ec2.describe_network_interfaces(
            Filters=[*ctx.tagged(), {"Name": "tag:Name", "Values": [f"{ctx.name}-superlink"]}]
        )["NetworkInterfaces"]
        return got[0]["NetworkInterfaceId"] if got else None

    def create(ctx):
        ec2 = ctx.client("ec2")
        return ec2.create_network_interface(
            SubnetId=_subnets(ctx)[0],
            Groups=[ctx.ids["server-sg"]],
            Description=f"fedyolo {ctx.name}: the SuperLink's fixed address",
            TagSpecifications=ctx.tag_spec("network-interface", f"{ctx.name}-superlink"),
        )["NetworkInterface"]["NetworkInterfaceId"]

    def delete(ctx, eni):
        ctx.client("ec2").delete_network_interface(NetworkInterfaceId=eni)

    return Resource(
        "network-interface", "superlink", find, create, delete, what="the SuperLink's fixed IP"
    )


# -- secrets -------------------------------------------------------------------------------
def parameter_names(ctx) -> list[str]:
    """Per role under its own prefix, the only one its instances may read (``/fedyolo/<name>/
    server/`` and ``/client/``): the CA's certificate is in both; a client's key only under
    ``client/slots/``, the server's only the public halves."""
    server, client = f"/fedyolo/{ctx.name}/server", f"/fedyolo/{ctx.name}/client"
    slots = range(int(ctx.cfg.clients.max))
    names = [f"{server}/tls/ca.crt", f"{server}/tls/superlink.crt", f"{server}/tls/superlink.key"]
    names += [f"{server}/clients/{i}/pub" for i in slots]
    names += [f"{client}/tls/ca.crt"] + [f"{client}/slots/{i}/key" for i in slots]
    return names + [f"{server}/state/key"]  # signs the server's copy in S3 (deploy.aws.s3state)


def _parameters() -> Resource:
    def find(ctx):
        ssm = ctx.client("ssm")
        names = parameter_names(ctx)
        got = []
        for i in range(0, len(names), 10):  # get_parameters takes 10 names per call
            got += ssm.get_parameters(Names=names[i : i + 10])["Parameters"]
        return sorted(p["Name"] for p in got) or None

    def create(ctx):
        from deploy.certs import make_node_keys, make_tls

        ssm = ctx.client("ssm")
        server, client = f"/fedyolo/{ctx.name}/server", f"/fedyolo/{ctx.name}/client"
        with tempfile.TemporaryDirectory(prefix="fedyolo-aws-") as tmp:
            tls = make_tls(Path(tmp) / "tls", [server_ip(ctx), "superlink"])
            slots = [str(i) for i in range(int(ctx.cfg.clients.max))]
            keys = make_node_keys(Path(tmp) / "keys", slots)
            values = {
                f"{server}/tls/ca.crt": tls.ca_cert.read_text(),
                f"{server}/tls/superlink.crt": tls.cert.read_text(),
                f"{server}/tls/superlink.key": tls.key.read_text(),
                f"{client}/tls/ca.crt": tls.ca_cert.read_text(),
            }
            for slot, k in keys.items():
                values[f"{client}/slots/{slot}/key"] = k.private.read_text()
                values[f"{server}/clients/{slot}/pub"] = k.public.read_text()
        values[f"{server}/state/key"] = secrets.token_hex(32)
        for name, value in values.items():  # private material as SecureString, all tagged
            ssm.put_parameter(
                Name=name,
                Value=value,
                Type="String" if name.endswith((".crt", "/pub")) else "SecureString",
                Tags=ctx.tags(),
            )
        return sorted(values)

    def delete(ctx, names):
        ssm = ctx.client("ssm")
        for i in range(0, len(names), 10):
            ssm.delete_parameters(Names=names[i : i + 10])

    return Resource(
        "ssm-parameters", "secrets", find, create, delete, what="TLS material, client keys"
    )


# -- identity ------------------------------------------------------------------------------
SSM_CORE = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"


def role_policy(ctx, role: str) -> dict:
    """Least privilege for one role; ``*`` only where the action has no resource level."""
    region, account, name = str(ctx.cfg.region), ctx.account, ctx.name
    params = f"arn:aws:ssm:{region}:{account}:parameter/fedyolo/{name}"
    prefix = str(ctx.cfg.state_prefix).strip("/")
    statements = [
        {
            "Sid": "PullOwnImage",
            "Effect": "Allow",
            "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
            "Resource": f"arn:aws:ecr:{region}:{account}:repository/{name}/{role}",
        },
        {  # AWS offers no resource level for this action
            "Sid": "EcrLogin",
            "Effect": "Allow",
            "Action": ["ecr:GetAuthorizationToken"],
            "Resource": "*",
        },
        {
            "Sid": "WriteOwnLogs",
            "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": f"arn:aws:logs:{region}:{account}:log-group:/fedyolo/{name}:*",
        },
    ]
    if role == "server":
        statements += [
            {
                "Sid": "ReadServerParameters",
                "Effect": "Allow",
                "Action": ["ssm:GetParameter", "ssm:GetParameters"],
                "Resource": f"{params}/server/*",
            },
            {
                "Sid": "ListState",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": f"arn:aws:s3:::{ctx.bucket}",
                "Condition": {"StringLike": {"s3:prefix": [f"{prefix}/*"]}},
            },
            {  # deploy.aws.s3state: content-addressed objects, the manifest, old objects dropped
                "Sid": "State",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                "Resource": f"arn:aws:s3:::{ctx.bucket}/{prefix}/*",
            },
            {  # PutMetricData has no resource level: limited to fedyolo's namespace
                "Sid": "Metrics",
                "Effect": "Allow",
                "Action": ["cloudwatch:PutMetricData"],
                "Resource": "*",
                "Condition": {"StringEquals": {"cloudwatch:namespace": NAMESPACE}},
            },
            {
                "Sid": "AttachFixedInterface",
                "Effect": "Allow",
                "Action": ["ec2:AttachNetworkInterface"],
                "Resource": [
                    f"arn:aws:ec2:{region}:{account}:network-interface/*",
                    f"arn:aws:ec2:{region}:{account}:instance/*",
                ],
                "Condition": {"StringEquals": {f"aws:ResourceTag/{TAG}": name}},
            },
        ]
    else:
        statements += [
            {
                "Sid": "ReadClientParameters",
                "Effect": "Allow",
                "Action": ["ssm:GetParameter"],
                "Resource": [f"{params}/client/tls/ca.crt", f"{params}/client/slots/*/key"],
            },
            {  # a client claims a key slot: a parameter it may create, never overwrite others'
                "Sid": "ClaimSlot",
                "Effect": "Allow",
                "Action": ["ssm:PutParameter", "ssm:GetParameter", "ssm:DeleteParameter"],
                "Resource": f"{params}/client/claims/*",
            },
        ]
    return {"Version": "2012-10-17", "Statement": statements}


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


def _role(role: str) -> Resource:
    def name(ctx):
        return f"{ctx.name}-{role}"

    def find(ctx):
        iam = ctx.client("iam")
        got = _none_if_missing(lambda: iam.get_instance_profile(InstanceProfileName=name(ctx)))
        return name(ctx) if got else None

    def create(ctx):
        iam = ctx.client("iam")
        if not _none_if_missing(lambda: iam.get_role(RoleName=name(ctx))):
            iam.create_role(
                RoleName=name(ctx),
                AssumeRolePolicyDocument=json.dumps(TRUST),
                Description=f"fedyolo {ctx.name}: {role} instances",
                Tags=ctx.tags(),
            )
        iam.put_role_policy(
            RoleName=name(ctx),
            PolicyName="fedyolo",
            PolicyDocument=json.dumps(role_policy(ctx, role)),
        )
        iam.attach_role_policy(RoleName=name(ctx), PolicyArn=SSM_CORE)
        iam.create_instance_profile(InstanceProfileName=name(ctx), Tags=ctx.tags())
        iam.add_role_to_instance_profile(InstanceProfileName=name(ctx), RoleName=name(ctx))
        return name(ctx)

    def delete(ctx, _name):
        iam = ctx.client("iam")
        n = name(ctx)
        prof = _none_if_missing(lambda: iam.get_instance_profile(InstanceProfileName=n))
        if prof:
            for r in prof["InstanceProfile"]["Roles"]:
                iam.remove_role_from_instance_profile(InstanceProfileName=n, RoleName=r["RoleName"])
            iam.delete_instance_profile(InstanceProfileName=n)
        if _none_if_missing(lambda: iam.get_role(RoleName=n)):
            for p in iam.list_role_policies(RoleName=n)["PolicyNames"]:
                iam.delete_role_policy(RoleName=n, PolicyName=p)
            for p in iam.list_attached_role_policies(RoleName=n)["AttachedPolicies"]:
                iam.detach_role_policy(RoleName=n, PolicyArn=p["PolicyArn"])
            iam.delete_role(RoleName=n)

    return Resource("iam-role", f"{role}-role", find, create, delete, what="role + profile")


# -- compute -------------------------------------------------------------------------------
def resolve_ami(ctx) -> str:
    ami = str(ctx.cfg.ami)
    if ami.startswith("resolve:ssm:"):
        name = ami.removeprefix("resolve:ssm:")
        try:
            return ctx.client("ssm").get_parameter(Name=name)["Parameter"]["Value"]
        except Exception as e:  # noqa: BLE001 - one line naming the parameter
            raise AwsError(f"deploy aws: ami: cannot read public parameter {name}: {e}") from e
    return ami


def _launch_template(role: str) -> Resource:
    def name(ctx):
        return f"{ctx.name}-{role}"

    def find(ctx):
        ec2 = ctx.client("ec2")
        got = _none_if_missing(
            lambda: ec2.describe_launch_templates(LaunchTemplateNames=[name(ctx)]),
            "NotFound",
        )
        return got["LaunchTemplates"][0]["LaunchTemplateId"] if got else None

    def create(ctx):
        from deploy.aws.userdata import render

        settings = ctx.cfg.server if role == "server" else ctx.cfg.clients
        sg = ctx.ids["server-sg" if role == "server" else "clients-sg"]
        data = {
            "ImageId": resolve_ami(ctx),
            "InstanceType": str(settings.instance_type),
            "IamInstanceProfile": {"Name": f"{ctx.name}-{role}"},
            "MetadataOptions": {  # IMDSv2 only
                "HttpTokens": "required",
                "HttpPutResponseHopLimit": 2,
                "HttpEndpoint": "enabled",
            },
            "BlockDeviceMappings": [
                {
                    "DeviceName": "/dev/xvda",
                    "Ebs": {
                        "VolumeSize": int(settings.volume_gb),
                        "VolumeType": "gp3",
                        "Encrypted": True,
                        "DeleteOnTermination": True,
                    },
                }
            ],
            "SecurityGroupIds": [sg],
            "UserData": base64.b64encode(render(ctx, role).encode()).decode(),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": ctx.tags(Name=name(ctx), role=role)},
                {"ResourceType": "volume", "Tags": ctx.tags(Name=name(ctx))},
            ],
        }
        return ctx.client("ec2").create_launch_template(
            LaunchTemplateName=name(ctx),
            LaunchTemplateData=data,
            TagSpecifications=ctx.tag_spec("launch-template", name(ctx)),
        )["LaunchTemplate"]["LaunchTemplateId"]

    def delete(ctx, lt):
        ctx.client("ec2").delete_launch_template(LaunchTemplateId=lt)

    return Resource("launch-template", f"{role}-template", find, create, delete)


def _group(role: str) -> Resource:
    def name(ctx):
        return f"{ctx.name}-{'server' if role == 'server' else 'clients'}"

    def find(ctx):
        asg = ctx.client("autoscaling")
        got = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name(ctx)])
        return name(ctx) if got["AutoScalingGroups"] else None

    def create(ctx):
        c = ctx.cfg.clients
        template = {"LaunchTemplateName": f"{ctx.name}-{role}", "Version": "$Latest"}
        tags = [
            {
                **t,
                "PropagateAtLaunch": True,
                "ResourceId": name(ctx),
                "ResourceType": "auto-scaling-group",
            }
            for t in ctx.tags(role=role)
        ]
        kw: dict[str, Any] = {
            "AutoScalingGroupName": name(ctx),
            "Tags": tags,
            "HealthCheckType": "EC2",
            "HealthCheckGracePeriod": 300,
        }
        if role == "server":  # one server, in the subnet of its fixed interface
            kw.update(
                MinSize=1,
                MaxSize=1,
                DesiredCapacity=1,
                LaunchTemplate=template,
                VPCZoneIdentifier=_subnets(ctx)[0],
            )
        else:
            kw.update(
                MinSize=int(c.min),
                MaxSize=int(c.max),
                DesiredCapacity=int(c.desired),
                VPCZoneIdentifier=",".join(_subnets(ctx)),
            )
            if c.spot:
                kw["MixedInstancesPolicy"] = {
                    "LaunchTemplate": {"LaunchTemplateSpecification": template},
                    "InstancesDistribution": {
                        "OnDemandBaseCapacity": int(c.on_demand_base),
                        "OnDemandPercentageAboveBaseCapacity": 0,
                        "SpotAllocationStrategy": "price-capacity-optimized",
                    },
                }
            else:
                kw["LaunchTemplate"] = template
        ctx.client("autoscaling").create_auto_scaling_group(**kw)
        return name(ctx)

    def delete(ctx, group):
        ctx.client("autoscaling").delete_auto_scaling_group(
            AutoScalingGroupName=group, ForceDelete=True
        )

    def hourly(ctx):
        p = ctx.cfg.prices
        if role == "server":
            t = str(ctx.cfg.server.instance_type)
            ebs = float(ctx.cfg.server.volume_gb) * float(p.ebs_gb_month) / 730
            return float(p.get(t, 0.0)) + ebs
        c = ctx.cfg.clients
        t, n = str(c.instance_type), int(c.desired)
        base = min(n, int(c.on_demand_base)) if c.spot else n
        spot = n - base
        ebs = n * float(c.volume_gb) * float(p.ebs_gb_month) / 730
        return float(p.get(t, 0.0)) * (base + spot * float(p.spot_factor)) + ebs

    return Resource("autoscaling-group", f"{role}-group", find, create, delete, hourly)


def resources(ctx: Context) -> list[Resource]:
    """Everything, in creation order (``down`` deletes in reverse)."""
    from deploy.aws import cloudwatch

    zones = len(ctx.cfg.vpc.subnets) if ctx.cfg.vpc.id else len(ctx.cfg.vpc.zones)
    return [
        _bucket(),
        _log_group(),
        _repository("server"),
        _repository("client"),
        _vpc(),
        _gateway(),
        *[_subnet(i) for i in range(zones)],
        _route_table(),
        _security_group("client"),
        _security_group("server"),
        _server_interface(),
        _parameters(),
        _role("server"),
        _role("client"),
        _launch_template("server"),
        _launch_template("client"),
        _group("server"),
        _group("client"),
        *cloudwatch.resources(),
    ]


def session():
    """boto3's default session: credentials, region and endpoint from its own settings
    (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...)."""
    import boto3

    return boto3.Session()


def plan(cfg, sess=None) -> list[dict]:
    """What ``up`` would do: one row per resource (create, or exists with its id); creates
    nothing (only describe/get calls)."""
    ctx = Context(cfg, sess or session())
    rows = []
    for r in resources(ctx):
        found = r.find(ctx)
        ctx.ids[r.name] = found if found is not None else f"<{r.name}>"
        rows.append(
            {
                "kind": r.kind,
                "name": r.name,
                "action": "exists" if found is not None else "create",
                "id": found,
                "usd_per_hour": round(r.hourly(ctx), 4),
                "what": r.what,
            }
        )
    return rows


def up(cfg, sess=None, *, fail_at: int | None = None) -> list[dict]:
    """Create what is missing, in order; idempotent. ``fail_at`` (tests): raise before the
    n-th creation, as a failing API call would."""
    ctx = Context(cfg, sess or session())
    rows, created = [], 0
    for r in resources(ctx):
        found = r.find(ctx)
        if found is None:
            if fail_at is not None and created == fail_at:
                raise AwsError(f"deploy aws up: injected failure before creating {r.kind} {r.name}")
            LOGGER.info("creating %s %s", r.kind, r.name)
            try:
                found = r.create(ctx)
            except Exception as e:
                raise AwsError(f"deploy aws up: {r.kind} {r.name}: {_one_line(e)}") from e
            created += 1
            action = "created"
        else:
            action = "exists"
        ctx.ids[r.name] = found
        rows.append({"kind": r.kind, "name": r.name, "action": action, "id": found})
    return rows


def down(cfg, sess=None) -> list[str]:
    """Delete everything of the deployment, in reverse order; return the leftovers (none is
    success). Safe to run again, and after an ``up`` that failed half-way."""
    ctx = Context(cfg, sess or session())
    res = resources(ctx)
    for r in res:  # ids first (a later resource's delete may need an earlier one's id)
        ctx.ids[r.name] = r.find(ctx)
    errors = []
    for r in reversed(res):
        rid = ctx.ids[r.name]
        if rid is None:
            continue
        try:
            LOGGER.info("deleting %s %s", r.kind, r.name)
            r.delete(ctx, rid)
        except Exception as e:  # noqa: BLE001 - go on; the check below names what is left
            errors.append(f"{r.kind} {r.name}: {_one_line(e)}")
    return errors + leftovers(cfg, ctx.session)


def leftovers(cfg, sess) -> list[str]:
    """One line per resource of the deployment that still exists."""
    ctx = Context(cfg, sess)
    left = []
    for r in resources(ctx):
        rid = r.find(ctx)
        ctx.ids[r.name] = rid
        if (
            rid is not None
            and rid not in ("reused", "none")
            and not (r.kind == "vpc" and cfg.vpc.id)
            and not (r.kind == "subnet" and cfg.vpc.id)
        ):
            left.append(f"left: {r.kind} {r.name} ({rid})")
    return left


def scale(cfg, n: int, sess=None) -> dict:
    c = cfg.clients
    if not int(c.min) <= n <= int(c.max):
        raise AwsError(f"deploy aws scale: {n} is outside clients.min..max ({c.min}..{c.max})")
    ctx = Context(cfg, sess or session())
    group = f"{ctx.name}-clients"
    ctx.client("autoscaling").set_desired_capacity(
        AutoScalingGroupName=group, DesiredCapacity=n, HonorCooldown=False
    )
    return {"group": group, "desired": n}


def status(cfg, sess=None) -> dict:
    """Instances and their health per group, and the federation's latest metrics."""
    from deploy.aws import cloudwatch

    ctx = Context(cfg, sess or session())
    asg = ctx.client("autoscaling")
    groups = {}
    for g in asg.describe_auto_scaling_groups(
        AutoScalingGroupNames=[f"{ctx.name}-server", f"{ctx.name}-clients"]
    )["AutoScalingGroups"]:
        groups[g["AutoScalingGroupName"]] = {
            "desired": g["DesiredCapacity"],
            "min": g["MinSize"],
            "max": g["MaxSize"],
            "instances": [
                {
                    "id": i["InstanceId"],
                    "state": i["LifecycleState"],
                    "health": i["HealthStatus"],
                    "zone": i["AvailabilityZone"],
                }
                for i in g["Instances"]
            ],
        }
    return {"deployment": ctx.name, "groups": groups, "federation": cloudwatch.latest(ctx)}


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
