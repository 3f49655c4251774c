"""The network: the configured VPC, or a new one with public subnets; the security groups; the
SuperLink's fixed network interface.

Flower 1.41 serves Fleet and Control on one port (``ports.fleet``, 9092): the server's group
admits the clients' group there, and ``operator_cidrs`` if any are configured (none by default:
operators forward the port through SSM Session Manager). Nothing else comes in; no SSH.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from deploy.aws.cfn import att, name, ref, sub, tags


def created(cfg: Any) -> bool:
    """True when the template makes the VPC (``vpc.id`` is null)."""
    return not cfg.vpc.id


def vpc_id(cfg: Any) -> Any:
    return ref("Vpc") if created(cfg) else str(cfg.vpc.id)


def subnet_ids(cfg: Any) -> list:
    if created(cfg):
        return [ref(f"Subnet{i}") for i in range(len(cfg.vpc.zones))]
    return [str(s) for s in cfg.vpc.subnets]


def vpc(cfg: Any) -> dict:
    """A VPC, an internet gateway, one public /24 per zone and their route table (or nothing)."""
    if not created(cfg):
        return {}
    n = name(cfg)
    blocks = ipaddress.ip_network(str(cfg.vpc.cidr)).subnets(new_prefix=24)
    out: dict[str, Any] = {
        "Vpc": {
            "Type": "AWS::EC2::VPC",
            "Properties": {
                "CidrBlock": str(cfg.vpc.cidr),
                "EnableDnsHostnames": True,
                "EnableDnsSupport": True,
                "Tags": tags(cfg, Name=f"{n}-vpc"),
            },
        },
        "Gateway": {
            "Type": "AWS::EC2::InternetGateway",
            "Properties": {"Tags": tags(cfg, Name=f"{n}-igw")},
        },
        "GatewayAttachment": {
            "Type": "AWS::EC2::VPCGatewayAttachment",
            "Properties": {"VpcId": ref("Vpc"), "InternetGatewayId": ref("Gateway")},
        },
        "RouteTable": {
            "Type": "AWS::EC2::RouteTable",
            "Properties": {"VpcId": ref("Vpc"), "Tags": tags(cfg, Name=f"{n}-rt")},
        },
        "DefaultRoute": {
            "Type": "AWS::EC2::Route",
            "DependsOn": "GatewayAttachment",
            "Properties": {
                "RouteTableId": ref("RouteTable"),
                "DestinationCidrBlock": "0.0.0.0/0",
                "GatewayId": ref("Gateway"),
            },
        },
    }
    for i, zone in enumerate(cfg.vpc.zones):
        out[f"Subnet{i}"] = {
            "Type": "AWS::EC2::Subnet",
            "Properties": {
                "VpcId": ref("Vpc"),
                "CidrBlock": str(next(blocks)),
                "AvailabilityZone": sub(f"${{AWS::Region}}{zone}"),  # vpc.zones: letters
                "MapPublicIpOnLaunch": True,  # pulls from ECR and the OS mirror; no NAT gateway
                "Tags": tags(cfg, Name=f"{n}-subnet-{i}"),
            },
        }
        out[f"Subnet{i}Routes"] = {
            "Type": "AWS::EC2::SubnetRouteTableAssociation",
            "Properties": {"SubnetId": ref(f"Subnet{i}"), "RouteTableId": ref("RouteTable")},
        }
    return out


def security_groups(cfg: Any) -> dict:
    n, port = name(cfg), int(cfg.ports.fleet)
    ingress = [
        {
            "IpProtocol": "tcp",
            "FromPort": port,
            "ToPort": port,
            "SourceSecurityGroupId": ref("ClientsSecurityGroup"),
            "Description": "SuperNodes: Flower's Fleet API",
        }
    ]
    ingress += [
        {
            "IpProtocol": "tcp",
            "FromPort": port,
            "ToPort": port,
            "CidrIp": str(c),
            "Description": "operator: Flower's Control API (same port)",
        }
        for c in cfg.operator_cidrs
    ]
    return {
        "ClientsSecurityGroup": {
            "Type": "AWS::EC2::SecurityGroup",
            "Properties": {
                "GroupName": f"{n}-clients-sg",
                "GroupDescription": f"fedyolo {n}: clients (no ingress)",
                "VpcId": vpc_id(cfg),
                "Tags": tags(cfg, Name=f"{n}-clients-sg"),
            },
        },
        "ServerSecurityGroup": {
            "Type": "AWS::EC2::SecurityGroup",
            "Properties": {
                "GroupName": f"{n}-server-sg",
                "GroupDescription": f"fedyolo {n}: the SuperLink (port {port} only)",
                "VpcId": vpc_id(cfg),
                "SecurityGroupIngress": ingress,
                "Tags": tags(cfg, Name=f"{n}-server-sg"),
            },
        },
    }


def server_interface(cfg: Any) -> dict:
    """A fixed private IP that a replacement server instance attaches: the clients' address and
    the SuperLink certificate's name survive the instance."""
    n = name(cfg)
    props: dict[str, Any] = {
        "SubnetId": subnet_ids(cfg)[0],
        "GroupSet": [ref("ServerSecurityGroup")],
        "Description": f"fedyolo {n}: the SuperLink's fixed address",
        "Tags": tags(cfg, Name=f"{n}-superlink"),
    }
    if cfg.server.private_ip:  # null: AWS picks one in the subnet
        props["PrivateIpAddress"] = str(cfg.server.private_ip)
    return {"ServerInterface": {"Type": "AWS::EC2::NetworkInterface", "Properties": props}}


def first_subnet(cfg: Any) -> ipaddress.IPv4Network | None:
    """The CIDR of the subnet that holds the SuperLink's interface, if the template makes it."""
    if not created(cfg):
        return None
    return next(ipaddress.ip_network(str(cfg.vpc.cidr)).subnets(new_prefix=24))


def outputs(cfg: Any) -> dict:
    return {
        "ServerPrivateIp": {
            "Description": "the SuperLink's address (clients dial it on ports.fleet)",
            "Value": att("ServerInterface", "PrimaryPrivateIpAddress"),
        },
        "ServerInterface": {"Value": ref("ServerInterface")},
    }
