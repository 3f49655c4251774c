"""CloudFormation for the AWS deployment, one module per resource family, as plain dicts.

``deploy.aws.template`` assembles them; each module here returns ``{logical id: resource}``.
The helpers below are CloudFormation's intrinsic functions and the deployment's tags, so a
resource reads as it would in a YAML template.
"""

from __future__ import annotations

from typing import Any

from deploy.aws import TAG

ROLES = ("server", "client")


def ref(logical_id: str) -> dict:
    return {"Ref": logical_id}


def att(logical_id: str, attribute: str) -> dict:
    return {"Fn::GetAtt": [logical_id, attribute]}


def sub(text: str, **values: Any) -> dict:
    """``Fn::Sub``: ``${AWS::Region}``, ``${AWS::AccountId}``, a logical id, or ``values``."""
    return {"Fn::Sub": [text, values] if values else text}


def name(cfg: Any) -> str:
    return str(cfg.name)


def tags(cfg: Any, **extra: str) -> list[dict[str, str]]:
    """The deployment tag (``down`` and the IAM conditions find resources by it), ``Name``..."""
    return [{"Key": TAG, "Value": name(cfg)}] + [{"Key": k, "Value": v} for k, v in extra.items()]


def title(role: str) -> str:
    """``server`` -> ``Server``: logical ids are alphanumeric."""
    return role.capitalize()


def parameter_prefix(cfg: Any, role: str) -> str:
    """Where a role's SSM parameters live; its instances read nothing else (``iam``)."""
    return f"/fedyolo/{name(cfg)}/{role}"


def checkov_skip(**reasons: str) -> dict:
    """A resource's ``Metadata`` that tells checkov which finding is accepted, and why."""
    return {"checkov": {"skip": [{"id": k, "comment": v} for k, v in reasons.items()]}}
