"""Compute: the AMI parameter, a launch template per role, the two Auto Scaling groups.

The user data is ``deploy/aws/userdata.sh`` rendered by ``deploy.aws.userdata.render_values``
with CloudFormation's values in place of the deployment's (the image URI, the SuperLink's fixed
IP and interface, the bucket): ``Fn::Sub`` fills them in, and every shell ``${...}`` of the
script is escaped as ``${!...}`` so that CloudFormation leaves it to bash.

Instance metadata: IMDSv2 only, hop limit 1, so no container reaches the instance's role
credentials through the default bridge network. The server's container uses the role today (its
S3 state sync and CloudWatch round metrics): the boot path must give it the role another way
(``--network host`` or credentials handed in) before this template replaces ``stack.py``.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from deploy.aws.cfn import att, name, ref, tags, title
from deploy.aws.cfn.network import created, subnet_ids
from deploy.aws.userdata import render_values

# placeholders that render_values accepts (no quote, $, backquote or backslash), then Fn::Sub's
_TOKENS = ("Image", "ServerIp", "Interface", "StateUrl")


def ami_parameter(cfg: Any) -> dict:
    """``ami``: an image id, or ``resolve:ssm:<public parameter>`` resolved by CloudFormation."""
    ami = str(cfg.ami)
    if ami.startswith("resolve:ssm:"):
        return {
            "Type": "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>",
            "Default": ami.removeprefix("resolve:ssm:"),
            "Description": "the instances' AMI (a public SSM parameter)",
        }
    return {"Type": "AWS::EC2::Image::Id", "Default": ami, "Description": "the instances' AMI"}


def _image(cfg: Any, role: str) -> Any:
    given = cfg.images[role]
    if given:
        return str(given)
    uri = att(f"{title(role)}Repository", "RepositoryUri")
    return {"Fn::Join": [":", [uri, version("fedyolo")]]}


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
                    "ImageId": ref("Ami"),
                    "InstanceType": str(settings.instance_type),
                    "IamInstanceProfile": {"Arn": att(f"{title(role)}Profile", "Arn")},
                    "MetadataOptions": {
                        "HttpTokens": "required",
                        "HttpPutResponseHopLimit": 1,
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


def groups(cfg: Any) -> dict:
    """The server's group of one (in its interface's subnet) and the clients' group: at most one
    client per key slot (``clients.max``); spot above ``on_demand_base`` over several types."""
    c, n = cfg.clients, name(cfg)
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
        "MinSize": str(int(c.min)),
        "MaxSize": str(int(c.max)),
        "DesiredCapacity": str(int(c.desired)),
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
                "MinSize": "1",
                "MaxSize": "1",
                "DesiredCapacity": "1",
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
