"""Compute: the AMI parameter, a launch template per role, the two Auto Scaling groups.

The user data is ``deploy/aws/userdata.sh`` rendered by ``deploy.aws.userdata.render_values``
with CloudFormation's values in place of the deployment's (the image URI, the SuperLink's fixed
IP and interface, the bucket): ``Fn::Sub`` fills them in, and every shell ``${...}`` of the
script is escaped as ``${!...}`` so that CloudFormation leaves it to bash.

Instance metadata: IMDSv2 only. The clients' hop limit is 1, so no client container reaches the
instance's role credentials through Docker's bridge network (one hop more). The server's is 2:
its container needs the server role itself, for the S3 state sync (``deploy.aws.s3state``:
``state/*`` of the bucket), the SSM state key that signs it, and the CloudWatch round metrics.

Images before instances: ``groups(cfg, sized=False)`` keeps both groups at 0 (min and desired)
until the deployment's images exist (``deploy.aws.stack.images_ready``); ``fedyolo deploy aws
push`` then sets them to their configured sizes.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from deploy.aws.cfn import att, name, ref, tags, title
from deploy.aws.cfn.network import created, subnet_ids
from deploy.aws.userdata import render_values

# placeholders that render_values accepts (no quote, $, backquote or backslash), then Fn::Sub's
_TOKENS = ("Image", "ServerIp", "Interface", "StateUrl")


ARCHS = ("x86_64", "arm64")
AL2023_ARM64 = "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"


def client_ami(cfg: Any) -> str:
    """``clients.ami``, else ``ami`` for x86_64 clients or Amazon Linux 2023's arm64 AMI."""
    if cfg.clients.get("ami"):
        return str(cfg.clients.ami)
    return AL2023_ARM64 if client_arch(cfg) == "arm64" else str(cfg.ami)


def client_arch(cfg: Any) -> str:
    return str(cfg.clients.get("arch") or "x86_64")


def ami_parameter(ami: str, who: str = "the instances'") -> dict:
    """An image id, or ``resolve:ssm:<public parameter>`` resolved by CloudFormation."""
    if ami.startswith("resolve:ssm:"):
        return {
            "Type": "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>",
            "Default": ami.removeprefix("resolve:ssm:"),
            "Description": f"{who} AMI (a public SSM parameter)",
        }
    return {"Type": "AWS::EC2::Image::Id", "Default": ami, "Description": f"{who} AMI"}


def parameters(cfg: Any) -> dict:
    """The template's parameters: the server's AMI, and the clients' when it differs."""
    out = {"Ami": ami_parameter(str(cfg.ami))}
    if client_ami(cfg) != str(cfg.ami):
        out["ClientAmi"] = ami_parameter(client_ami(cfg), f"the {client_arch(cfg)} clients'")
    return out


def image_tag(cfg: Any, role: str) -> str:
    """The tag a role's image has in the deployment's repository: this fedyolo's version, and
    ``-arm64`` for arm64 clients (the repositories' tags are immutable: an x86_64 image pushed
    under the version must never be what Graviton clients pull)."""
    arch = client_arch(cfg) if role == "client" else "x86_64"
    return version("fedyolo") + ("" if arch == "x86_64" else f"-{arch}")


def _image(cfg: Any, role: str) -> Any:
    given = cfg.images[role]
    if given:
        return str(given)
    uri = att(f"{title(role)}Repository", "RepositoryUri")
    return {"Fn::Join": [":", [uri, image_tag(cfg, role)]]}


def user_data(cfg: Any, role: str) -> dict:
    """``Fn::Base64`` of the rendered boot script with CloudFormation's values substituted."""
    text = render_values(
        cfg,
        role,
        name=name(cfg),
        image="{{Image}}",
        server_ip="{{ServerIp}}",
        interface="{{Interface}}",
        state_url="{{StateUrl}}",
    )
    text = text.replace("${", "${!")
    for token in _TOKENS:
        text = text.replace("{{" + token + "}}", "${" + token + "}")
    prefix = str(cfg.state_prefix).strip("/")
    values = {
        "Image": _image(cfg, role),
        "ServerIp": att("ServerInterface", "PrimaryPrivateIpAddress"),
        "Interface": ref("ServerInterface"),
        "StateUrl": {"Fn::Sub": f"s3://${{StateBucket}}/{prefix}"},
    }
    return {"Fn::Base64": {"Fn::Sub": [text, values]}}


def hop_limit(role: str) -> int:
    """IMDS hops: the server's container uses the instance role (S3 state, SSM state key,
    CloudWatch metrics) from Docker's bridge network, one hop more; a client's never does."""
    return 2 if role == "server" else 1


def _ami_ref(cfg: Any, role: str) -> str:
    return "ClientAmi" if role == "client" and "ClientAmi" in parameters(cfg) else "Ami"


def launch_templates(cfg: Any) -> dict:
    out = {}
    for role in ("server", "client"):
        settings = cfg.server if role == "server" else cfg.clients
        sg = "ServerSecurityGroup" if role == "server" else "ClientsSecurityGroup"
        n = f"{name(cfg)}-{role}"
        out[f"{title(role)}LaunchTemplate"] = {
            "Type": "AWS::EC2::LaunchTemplate",
            "Properties": {
                "LaunchTemplateName": n,
                "LaunchTemplateData": {
                    "ImageId": ref(_ami_ref(cfg, role)),
                    "InstanceType": str(settings.instance_type),
                    "IamInstanceProfile": {"Arn": att(f"{title(role)}Profile", "Arn")},
                    "MetadataOptions": {
                        "HttpTokens": "required",
                        "HttpPutResponseHopLimit": hop_limit(role),
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
                    "SecurityGroupIds": [ref(sg)],
                    "UserData": user_data(cfg, role),
                    "TagSpecifications": [
                        {"ResourceType": "instance", "Tags": tags(cfg, Name=n, role=role)},
                        {"ResourceType": "volume", "Tags": tags(cfg, Name=n)},
                    ],
                },
            },
        }
    return out


def _group_tags(cfg: Any, role: str) -> list[dict]:
    return [{**t, "PropagateAtLaunch": True} for t in tags(cfg, role=role)]


def sizes(cfg: Any, sized: bool) -> dict[str, tuple[int, int, int]]:
    """(min, desired, max) per group: the configured sizes, or 0 while no image exists to boot.
    Desired clients = the data holders (one per key slot, ``clients.max`` slots); no scaling
    policy: a replaced client (spot, health) is the group's, and rejoins on a free slot."""
    c = cfg.clients
    if not sized:
        return {"server": (0, 0, 1), "client": (0, 0, int(c.max))}
    return {"server": (1, 1, 1), "client": (int(c.min), int(c.desired), int(c.max))}


def groups(cfg: Any, sized: bool = True) -> dict:
    """The server's group of one (in its interface's subnet) and the clients' group: at most one
    client per key slot (``clients.max``); spot above ``on_demand_base`` over several types."""
    c, n = cfg.clients, name(cfg)
    size = sizes(cfg, sized)
    after = ["DefaultRoute"] if created(cfg) else []
    template = {
        role: {
            "LaunchTemplateId": ref(f"{title(role)}LaunchTemplate"),
            "Version": att(f"{title(role)}LaunchTemplate", "LatestVersionNumber"),
        }
        for role in ("server", "client")
    }
    clients: dict[str, Any] = {
        "AutoScalingGroupName": f"{n}-clients",
        "MinSize": str(size["client"][0]),
        "MaxSize": str(size["client"][2]),
        "DesiredCapacity": str(size["client"][1]),
        "VPCZoneIdentifier": subnet_ids(cfg),
        "HealthCheckType": "EC2",
        "HealthCheckGracePeriod": 300,
        "Tags": _group_tags(cfg, "client"),
    }
    if c.spot:
        types = [str(c.instance_type), *[str(t) for t in c.spot_types if t != c.instance_type]]
        clients["CapacityRebalance"] = True
        clients["MixedInstancesPolicy"] = {
            "LaunchTemplate": {
                "LaunchTemplateSpecification": template["client"],
                "Overrides": [{"InstanceType": t} for t in types],
            },
            "InstancesDistribution": {
                "OnDemandBaseCapacity": int(c.on_demand_base),
                "OnDemandPercentageAboveBaseCapacity": 0,
                "SpotAllocationStrategy": "price-capacity-optimized",
            },
        }
    else:
        clients["LaunchTemplate"] = template["client"]
    return {
        "ServerGroup": {
            "Type": "AWS::AutoScaling::AutoScalingGroup",
            "DependsOn": after,
            "Properties": {
                "AutoScalingGroupName": f"{n}-server",
                "MinSize": str(size["server"][0]),
                "MaxSize": str(size["server"][2]),
                "DesiredCapacity": str(size["server"][1]),
                "LaunchTemplate": template["server"],
                "VPCZoneIdentifier": subnet_ids(cfg)[:1],
                "HealthCheckType": "EC2",
                "HealthCheckGracePeriod": 300,
                "Tags": _group_tags(cfg, "server"),
            },
        },
        "ClientGroup": {
            "Type": "AWS::AutoScaling::AutoScalingGroup",
            "DependsOn": after,
            "Properties": clients,
        },
    }


def outputs(cfg: Any) -> dict:
    return {
        "ServerGroup": {"Value": ref("ServerGroup")},
        "ClientGroup": {"Value": ref("ClientGroup")},
    }
