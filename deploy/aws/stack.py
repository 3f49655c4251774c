"""The AWS deployment as one CloudFormation stack: ``plan``, ``up``, status, scale, down.

The template (``deploy.aws.template``) is generated from the settings; the verbs deploy it with
change sets, so CloudFormation decides what changes and rolls a failed change back itself:

* ``plan``: a change set (CREATE for a new stack, UPDATE otherwise), its changes listed (Add,
  Modify with its replacement, Remove) with the costs (``deploy.aws.costs``), then deleted;
  nothing changes (a new stack's review placeholder is deleted too).
* ``up``: the same change set, executed and waited for; on failure CloudFormation rolls the stack
  back and ``up`` says which resource failed and why, in one line. Then the SecureStrings that
  CloudFormation cannot create (``deploy.aws.secrets``). The groups stay at 0 instances until
  the deployment's images exist (``images_ready``): ``push`` (``deploy.aws.ecr``) sets them to
  their sizes (``release``).
* ``down``: deletes the stack and waits; the state bucket is kept (``DeletionPolicy: Retain``)
  unless ``delete_state``; the SSM parameters (keys, claims) are deleted.
* ``status``: the stack, its outputs, the live groups, drift, the federation's last round.
* ``scale``: the clients' desired count, within the key slots and the live group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.aws import TAG, AwsError

LOGGER = logging.getLogger("fedyolo")

CONFIG = Path(__file__).resolve().parent.parent.parent / "configs" / "deploy" / "aws.yaml"
NAMESPACE = "fedyolo"  # CloudWatch namespace of the server's metrics (deploy.aws.cloudwatch)
ROLES = ("server", "client")
CAPABILITIES = ["CAPABILITY_NAMED_IAM"]  # the roles have names
NO_CHANGES = ("didn't contain changes", "No updates are to be performed")
GONE = ("DELETE_COMPLETE",)
REDO = ("REVIEW_IN_PROGRESS", "ROLLBACK_COMPLETE", "ROLLBACK_FAILED")  # deleted, then created
WAIT = {"Delay": 5, "MaxAttempts": 720}  # an hour


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
    """The settings and a boto3 session (its credentials, region default and endpoint)."""

    cfg: Any
    session: Any

    def client(self, service: str, **config: Any):
        kw = {}
        if config:
            from botocore.config import Config

            kw["config"] = Config(**config)
        return self.session.client(service, region_name=str(self.cfg.region), **kw)

    @property
    def name(self) -> str:
        return str(self.cfg.name)

    @property
    def stack(self) -> str:
        return f"fedyolo-{self.name}"

    def tags(self, **extra: str) -> list[dict[str, str]]:
        return [{"Key": TAG, "Value": self.name}] + [
            {"Key": k, "Value": v} for k, v in extra.items()
        ]

    @property
    def account(self) -> str:
        return self.client("sts").get_caller_identity()["Account"]

    @property
    def bucket(self) -> str:
        return f"{self.name}-state-{self.account}-{self.cfg.region}".lower()

    def group(self, role: str) -> str:
        return f"{self.name}-{'server' if role == 'server' else 'clients'}"


def stack_name(cfg: Any) -> str:
    return Context(cfg, None).stack


def bucket_name(cfg: Any, sess: Any = None) -> str:
    """The state bucket (``deploy.aws.cfn.storage``): ``<name>-state-<account>-<region>``."""
    return Context(cfg, sess or session()).bucket


def session():
    """boto3's default session: credentials, region and endpoint from its own settings
    (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...)."""
    import boto3

    return boto3.Session()


def _code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


def _one_line(e: Exception | str) -> str:
    return " ".join(str(e).split())


def parameter_names(ctx: Context) -> list[str]:
    """The SSM parameters ``up`` writes (``deploy.aws.secrets``), per role."""
    from deploy.aws import secrets

    return secrets.names(ctx.name, int(ctx.cfg.clients.max))


# -- the stack ------------------------------------------------------------------------------
def describe(ctx: Context) -> dict | None:
    """The stack, or None when there is none (deleted stacks are none)."""
    from botocore.exceptions import ClientError

    try:
        [st] = ctx.client("cloudformation").describe_stacks(StackName=ctx.stack)["Stacks"]
    except ClientError as e:
        if "does not exist" in str(e):
            return None
        raise
    return None if st["StackStatus"] in GONE else st


def images_ready(ctx: Context) -> bool:
    """True when both roles' images exist: given as ``images.<role>``, or in the deployment's
    ECR repository at this fedyolo's version (what the launch templates pull)."""
    from botocore.exceptions import ClientError

    from deploy.aws.cfn.compute import image_tag

    ecr = ctx.client("ecr")
    for role in ROLES:
        if ctx.cfg.images[role]:
            continue
        try:
            got = ecr.describe_images(
                repositoryName=f"{ctx.name.lower()}/{role}",
                imageIds=[{"imageTag": image_tag(ctx.cfg, role)}],
            )
        except ClientError as e:
            if "NotFound" in _code(e):
                return False
            raise
        if not got.get("imageDetails"):
            return False
    return True


def _body(ctx: Context, sized: bool) -> str:
    from deploy.aws.template import to_json

    return to_json(ctx.cfg, sized=sized)


def _change_set(ctx: Context, body: str) -> tuple[str, list[dict], bool]:
    """Create a change set and wait for it: (its name, the changes, whether it creates the
    stack). No changes: an empty list (the change set is deleted)."""
    from botocore.exceptions import WaiterError

    cf = ctx.client("cloudformation")
    st = describe(ctx)
    if st is not None and st["StackStatus"] in REDO:  # a plan's placeholder, a failed create
        LOGGER.info("stack %s is %s: deleting it first", ctx.stack, st["StackStatus"])
        cf.delete_stack(StackName=ctx.stack)
        cf.get_waiter("stack_delete_complete").wait(StackName=ctx.stack, WaiterConfig=WAIT)
        st = None
    elif st is not None and st["StackStatus"].endswith("_IN_PROGRESS"):
        raise AwsError(
            f"deploy aws: stack {ctx.stack} is {st['StackStatus']}: wait for it, then run again"
        )
    create = st is None
    name = f"fedyolo-{time.strftime('%Y%m%d%H%M%S')}"
    cf.create_change_set(
        StackName=ctx.stack,
        ChangeSetName=name,
        TemplateBody=body,
        ChangeSetType="CREATE" if create else "UPDATE",
        Capabilities=CAPABILITIES,
        Tags=ctx.tags(),
    )
    try:
        cf.get_waiter("change_set_create_complete").wait(
            StackName=ctx.stack, ChangeSetName=name, WaiterConfig=WAIT
        )
    except WaiterError as e:
        got = cf.describe_change_set(StackName=ctx.stack, ChangeSetName=name)
        reason = got.get("StatusReason", "")
        if any(s in reason for s in NO_CHANGES):
            cf.delete_change_set(StackName=ctx.stack, ChangeSetName=name)
            return name, [], create
        raise AwsError(f"deploy aws: change set of {ctx.stack} failed: {_one_line(reason)}") from e
    changes = []
    for page in cf.get_paginator("describe_change_set").paginate(
        StackName=ctx.stack, ChangeSetName=name
    ):
        changes += [c["ResourceChange"] for c in page["Changes"] if c["Type"] == "Resource"]
    return name, [_change_row(c) for c in changes], create


def _change_row(c: dict) -> dict:
    return {
        "action": c["Action"],  # Add, Modify, Remove, Import, Dynamic
        "logical": c["LogicalResourceId"],
        "type": c.get("ResourceType", ""),
        "replacement": c.get("Replacement", ""),  # True, False, Conditional
        "physical": c.get("PhysicalResourceId", ""),
    }


def _discard(ctx: Context, name: str, create: bool) -> None:
    cf = ctx.client("cloudformation")
    cf.delete_change_set(StackName=ctx.stack, ChangeSetName=name)
    if create:  # CloudFormation keeps a REVIEW_IN_PROGRESS stack for a CREATE change set
        cf.delete_stack(StackName=ctx.stack)


def live_counts(ctx: Context) -> dict[str, int] | None:
    """Desired instances per role of the live groups, or None when there are none."""
    got = ctx.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[ctx.group(r) for r in ROLES]
    )["AutoScalingGroups"]
    by_name = {g["AutoScalingGroupName"]: g["DesiredCapacity"] for g in got}
    if not by_name:
        return None
    return {r: int(by_name.get(ctx.group(r), 0)) for r in ROLES}


def instance_types(cfg: Any) -> list[tuple[str, str, str]]:
    """(setting, instance type, the arch it needs) of each type the stack launches: the
    server image is x86_64, the clients' ``clients.arch`` (a type both roles use is checked
    for both)."""
    from deploy.aws.cfn.compute import client_arch

    c, arch = cfg.clients, client_arch(cfg)
    out = [
        ("server.instance_type", str(cfg.server.instance_type), "x86_64"),
        ("clients.instance_type", str(c.instance_type), arch),
    ]
    if c.spot:
        out += [("clients.spot_types", str(t), arch) for t in c.spot_types]
    return list(dict.fromkeys(out))


def preflight(ctx: Context, verb: str) -> None:
    """What CloudFormation or the instances would fail on, refused first in one line: an
    instance type the region does not offer or of the wrong arch, a state bucket name that
    another account holds."""
    from botocore.exceptions import ClientError

    entries = instance_types(ctx.cfg)
    types = sorted({t for _, t, _ in entries})
    ec2 = ctx.client("ec2")
    got = ec2.describe_instance_type_offerings(
        LocationType="region", Filters=[{"Name": "instance-type", "Values": types}]
    )["InstanceTypeOfferings"]
    offered = {o["InstanceType"] for o in got}
    missing = [f"{key}={t}" for key, t, _ in entries if t not in offered]
    if missing:
        raise AwsError(
            f"deploy aws {verb}: {', '.join(missing)}: not offered in region {ctx.cfg.region}"
        )
    described = ec2.describe_instance_types(InstanceTypes=types)["InstanceTypes"]
    archs = {
        d["InstanceType"]: d.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
        for d in described
    }
    wrong = []
    for key, t, arch in entries:
        has = archs.get(t, [])
        if arch not in has:
            hint = "clients.arch" if key.startswith("clients") else "the server image"
            wrong.append(f"{key}={t} is {'/'.join(has) or '?'}, not {arch} ({hint})")
    if wrong:
        raise AwsError(f"deploy aws {verb}: {'; '.join(wrong)}")
    try:
        ctx.client("s3").head_bucket(Bucket=ctx.bucket, ExpectedBucketOwner=ctx.account)
    except ClientError as e:
        if _code(e) in ("403", "AccessDenied"):  # exists, and is not this account's
            raise AwsError(
                f"deploy aws {verb}: the state bucket name {ctx.bucket} belongs to another "
                "account (or denies this one): pick another name="
            ) from None
        if _code(e) not in ("404", "NoSuchBucket", "NotFound"):
            raise


def plan(cfg, sess=None) -> dict:
    """What ``up`` would change, and what the stack costs; changes nothing."""
    from deploy.aws import costs

    ctx = Context(cfg, sess or session())
    preflight(ctx, "plan")
    exists = describe(ctx) is not None
    sized = images_ready(ctx)
    name, changes, create = _change_set(ctx, _body(ctx, sized))
    if changes:
        _discard(ctx, name, create)
    counts = live_counts(ctx) if exists else None
    configured = {"server": 1, "client": int(cfg.clients.desired)}
    items = costs.rows(cfg, counts or configured)
    return {
        "stack": ctx.stack,
        "exists": exists,
        "images_ready": sized,
        "changes": changes,
        "counts": "live" if counts else "configured",
        "costs": items,
        "usd_month": costs.total(items),
    }


def _failure(ctx: Context) -> str:
    """The first failed resource of the latest operation and CloudFormation's reason."""
    events = ctx.client("cloudformation").describe_stack_events(StackName=ctx.stack)
    return first_failure(events["StackEvents"])


def first_failure(events: list[dict]) -> str:
    """``events`` newest first (as CloudFormation lists them): the oldest ``*_FAILED`` of a
    resource since the latest stack operation began, as ``Logical (Type): reason``."""
    failed = []
    for e in events:
        if (
            e.get("ResourceType") == "AWS::CloudFormation::Stack"
            and e["ResourceStatus"].endswith("_IN_PROGRESS")
            and e.get("ResourceStatusReason") == "User Initiated"
        ):
            break  # the operation's start
        if e["ResourceStatus"].endswith("_FAILED") and e.get("ResourceType") != (
            "AWS::CloudFormation::Stack"
        ):
            failed.append(e)
    if not failed:
        return "no resource reported a failure"
    e = failed[-1]
    reason = _one_line(e.get("ResourceStatusReason", "no reason given"))
    return f"{e['LogicalResourceId']} ({e['ResourceType']}): {reason}"


def _execute(ctx: Context, name: str, create: bool) -> str:
    """Execute a change set and wait; CloudFormation rolls back a failure, and the failing
    resource is one line. Returns the stack's final status."""
    from botocore.exceptions import ClientError, WaiterError

    cf = ctx.client("cloudformation", retries={"max_attempts": 1})
    try:
        cf.execute_change_set(StackName=ctx.stack, ChangeSetName=name)
    except ClientError as e:  # refused before any resource changed (or moto's inline failure)
        raise AwsError(f"deploy aws up: {ctx.stack}: {_one_line(e)}") from e
    waiter = "stack_create_complete" if create else "stack_update_complete"
    try:
        cf.get_waiter(waiter).wait(StackName=ctx.stack, WaiterConfig=WAIT)
    except WaiterError as e:
        st = describe(ctx)
        status = st["StackStatus"] if st else "gone"
        raise AwsError(
            f"deploy aws up: {_failure(ctx)}; CloudFormation rolled {ctx.stack} back ({status})"
        ) from e
    st = describe(ctx)
    return st["StackStatus"] if st else "gone"


def _deploy(ctx: Context, sized: bool) -> dict:
    name, changes, create = _change_set(ctx, _body(ctx, sized))
    if not changes:
        st = describe(ctx)
        return {"changes": [], "status": st["StackStatus"] if st else "none"}
    LOGGER.info("%s: %d changes, executing", ctx.stack, len(changes))
    return {"changes": changes, "status": _execute(ctx, name, create)}


def server_ip(ctx: Context) -> str:
    """The SuperLink's private IP: the stack's interface (its output ``ServerPrivateIp``)."""
    res = ctx.client("cloudformation").describe_stack_resource(
        StackName=ctx.stack, LogicalResourceId="ServerInterface"
    )["StackResourceDetail"]
    eni = ctx.client("ec2").describe_network_interfaces(
        NetworkInterfaceIds=[res["PhysicalResourceId"]]
    )
    return eni["NetworkInterfaces"][0]["PrivateIpAddress"]


def up(cfg, sess=None) -> dict:
    """Create or update the stack, then the SecureStrings; the groups get instances only when
    the images exist and the keys are written (a second change set if needed)."""
    from deploy.aws import secrets

    ctx = Context(cfg, sess or session())
    preflight(ctx, "up")
    exists = describe(ctx) is not None
    if not exists and _bucket_exists(ctx):  # CloudFormation would fail on it, half-way
        raise AwsError(
            f"deploy aws up: the state bucket {ctx.bucket} exists (kept by an earlier `down`); "
            "copy what you need, then `fedyolo deploy aws down --delete-state`, or pick another "
            "name"
        )
    ready = images_ready(ctx)
    had_keys = exists and _has_keys(ctx)
    if exists and not ready and _live_sized(ctx):  # never 0 because a new version is unpushed
        LOGGER.warning(
            "%s: no image of this fedyolo version in ECR: the groups keep their sizes, but a "
            "new instance would pull nothing; run `fedyolo deploy aws push`",
            ctx.stack,
        )
        ready = True
    first = _deploy(ctx, sized=ready and had_keys)
    keys = secrets.write(
        ctx.client("ssm"), ctx.name, int(cfg.clients.max), server_ip(ctx), ctx.tags()
    )
    changes = first["changes"]
    if ready and not had_keys:  # the keys exist now: the instances may boot
        changes += _deploy(ctx, sized=True)["changes"]
    st = describe(ctx) or {}
    return {
        "stack": ctx.stack,
        "status": st.get("StackStatus"),
        "changes": changes,
        "images_ready": ready,
        "parameters": {"created": len(keys["created"]), "kept": len(keys["kept"])},
    }


def _live_sized(ctx: Context) -> bool:
    """True once the server's group has its size (``release`` or a sized template)."""
    got = ctx.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[ctx.group("server")]
    )["AutoScalingGroups"]
    return bool(got) and got[0]["MinSize"] >= 1


def _has_keys(ctx: Context) -> bool:
    names = parameter_names(ctx)
    ssm, found = ctx.client("ssm"), 0
    for i in range(0, len(names), 10):
        found += len(ssm.get_parameters(Names=names[i : i + 10])["Parameters"])
    return found == len(names)


def release(ctx: Context) -> list[dict]:
    """After ``push``: groups at 0 get their configured sizes; groups with instances get an
    instance refresh (they run the previous image)."""
    from deploy.aws.cfn.compute import sizes

    asg = ctx.client("autoscaling")
    rows = []
    for role, (low, want, high) in sizes(ctx.cfg, sized=True).items():
        group = ctx.group(role)
        got = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
        if not got:
            raise AwsError(f"deploy aws push: no group {group}; run `fedyolo deploy aws up` first")
        if got[0]["DesiredCapacity"] == 0:
            asg.update_auto_scaling_group(
                AutoScalingGroupName=group, MinSize=low, MaxSize=high, DesiredCapacity=want
            )
            rows.append({"group": group, "action": "sized", "desired": want})
        else:
            asg.start_instance_refresh(
                AutoScalingGroupName=group,
                Preferences={"MinHealthyPercentage": 0 if role == "server" else 50},
            )
            rows.append({"group": group, "action": "instance refresh"})
    return rows


def down(cfg, sess=None, *, delete_state: bool = False) -> list[str]:
    """Delete the stack and wait; then the SSM parameters; the state bucket only with
    ``delete_state``. Returns one line per leftover (none is success)."""
    from botocore.exceptions import ClientError, WaiterError

    from deploy.aws import secrets

    ctx = Context(cfg, sess or session())
    cf = ctx.client("cloudformation")
    left: list[str] = []
    if describe(ctx) is not None:
        LOGGER.info("deleting stack %s", ctx.stack)
        try:
            cf.delete_stack(StackName=ctx.stack)
            cf.get_waiter("stack_delete_complete").wait(StackName=ctx.stack, WaiterConfig=WAIT)
        except WaiterError:
            left.append(f"left: stack {ctx.stack}: {_failure(ctx)}")
        except ClientError as e:  # refused at once (moto deletes inline)
            left.append(f"left: stack {ctx.stack}: {_one_line(e)}")
    if left:  # instances may still run on these keys
        return left
    gone = secrets.delete_all(ctx.client("ssm"), ctx.name)
    LOGGER.info("deleted %d SSM parameters under /fedyolo/%s/", len(gone), ctx.name)
    if delete_state:
        _delete_bucket(ctx)
    elif _bucket_exists(ctx):
        LOGGER.info("kept s3://%s (the state; `down --delete-state` deletes it)", ctx.bucket)
    st = describe(ctx)
    if st is not None and not left:
        left.append(f"left: stack {ctx.stack} ({st['StackStatus']})")
    if delete_state and _bucket_exists(ctx):
        left.append(f"left: bucket {ctx.bucket}")
    return left


def _bucket_exists(ctx: Context) -> bool:
    from botocore.exceptions import ClientError

    try:
        ctx.client("s3").head_bucket(Bucket=ctx.bucket, ExpectedBucketOwner=ctx.account)
    except ClientError:
        return False
    return True


def _delete_bucket(ctx: Context) -> None:
    """Every version and delete marker, then the bucket (``down --delete-state``)."""
    if not _bucket_exists(ctx):
        return
    s3 = ctx.client("s3")
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=ctx.bucket):
        objs = [
            {"Key": v["Key"], "VersionId": v["VersionId"]}
            for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
        ]
        if objs:
            s3.delete_objects(Bucket=ctx.bucket, Delete={"Objects": objs, "Quiet": True})
    s3.delete_bucket(Bucket=ctx.bucket)
    LOGGER.info("deleted s3://%s and its every version", ctx.bucket)


# -- scale and status -----------------------------------------------------------------------
def scale(cfg, n: int, sess=None) -> dict:
    """The clients' desired count: at most one client per key slot (``clients.max``), and
    within the live group's min..max."""
    slots = int(cfg.clients.max)
    if not 0 <= n <= slots:
        raise AwsError(
            f"deploy aws scale: {n} clients but {slots} key slots (clients.max): at most {slots}"
        )
    ctx = Context(cfg, sess or session())
    group = ctx.group("client")
    asg = ctx.client("autoscaling")
    got = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
    if not got:
        raise AwsError(f"deploy aws scale: no group {group}; run `fedyolo deploy aws up` first")
    low, high = got[0]["MinSize"], got[0]["MaxSize"]
    if high == 0 or got[0]["DesiredCapacity"] == 0 and n > 0 and not images_ready(ctx):
        raise AwsError(f"deploy aws scale: {group} waits for its images; run `push` first")
    if not low <= n <= high:
        raise AwsError(
            f"deploy aws scale: {n} is outside the live group's {low}..{high}; "
            "change clients.min/max and run `up` first"
        )
    asg.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=n, HonorCooldown=False)
    return {"group": group, "desired": n, "slots": slots}


def drift(ctx: Context, timeout_s: float = 120) -> Any:
    """The stack's drift: resources changed or deleted by hand; where the endpoint does not
    implement drift detection (moto), one line saying so."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError  # moto's 500 "not implemented"

    cf = ctx.client("cloudformation", retries={"max_attempts": 1})
    try:
        det = cf.detect_stack_drift(StackName=ctx.stack)["StackDriftDetectionId"]
        end = time.monotonic() + timeout_s
        while True:
            got = cf.describe_stack_drift_detection_status(StackDriftDetectionId=det)
            if got["DetectionStatus"] != "DETECTION_IN_PROGRESS" or time.monotonic() > end:
                break
            time.sleep(3)
        drifted = cf.describe_stack_resource_drifts(
            StackName=ctx.stack, StackResourceDriftStatusFilters=["MODIFIED", "DELETED"]
        )["StackResourceDrifts"]
    except (BotoCoreError, ClientError, ResponseParserError) as e:
        return f"drift: not available from this endpoint ({_one_line(e)[:160]})"
    return {
        "status": got.get("StackDriftStatus", got["DetectionStatus"]),
        "resources": [
            {"logical": d["LogicalResourceId"], "drift": d["StackResourceDriftStatus"]}
            for d in drifted
        ],
    }


def status(cfg, sess=None) -> dict:
    """The stack, its outputs, the live groups, drift and the federation's latest metrics."""
    from deploy.aws import cloudwatch

    ctx = Context(cfg, sess or session())
    st = describe(ctx)
    if st is None:
        return {"stack": ctx.stack, "status": "none (run `fedyolo deploy aws up`)"}
    groups = {}
    for g in ctx.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[ctx.group(r) for r in ROLES]
    )["AutoScalingGroups"]:
        groups[g["AutoScalingGroupName"]] = {
            "desired": g["DesiredCapacity"],
            "in_service": sum(i["LifecycleState"] == "InService" for i in g["Instances"]),
            "min": g["MinSize"],
            "max": g["MaxSize"],
        }
    return {
        "stack": ctx.stack,
        "status": st["StackStatus"],
        "outputs": {o["OutputKey"]: o["OutputValue"] for o in st.get("Outputs", [])},
        "groups": groups,
        "drift": drift(ctx),
        "federation": cloudwatch.latest(ctx),
    }
