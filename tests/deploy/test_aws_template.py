"""The CloudFormation template (``deploy.aws.template``): cfn-lint, the README's least-privilege
and network claims checked on the template itself, bad settings as one line, and moto's
CloudFormation creating the stack.

moto 5.2.5's CloudFormation keeps these as placeholders (no resource behind them):
``AWS::CloudWatch::Alarm``, ``AWS::S3::BucketPolicy``, ``AWS::SNS::TopicPolicy``,
``AWS::SNS::Subscription``, ``AWS::Budgets::Budget``; it ignores the bucket's versioning, the ECR
lifecycle policy and the group's ``CapacityRebalance``; ``delete_stack`` of a stack that created
its VPC stops on the VPC (the placeholder instances' interfaces and the gateway stay) and forgets
the stack; ``detect_stack_drift`` is not implemented. Those are asserted on the template only.
checkov (``--skip-download``, from its own venv ``.venv-checkov``: ``make checkov``) scans the
template too; it is required in CI (``FEDYOLO_REQUIRE_CHECKOV``).
Change sets work in moto on this template (seen 2026-12-03, by hand: CREATE, then UPDATE with
``clients.max=6`` listed Modify on both launch templates and the clients' group and applied it).
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.aws import TAG, AwsError, stack, template  # noqa: E402
from deploy.aws.cfn import iam  # noqa: E402

REGION = "eu-west-1"  # the `aws` fixture's (tests/conftest.py)
ALL_OPTIONS = [
    "budget.monthly_usd=50",
    "alarms.email=ops@example.com",
    "operator_cidrs=[203.0.113.7/32]",
]
REUSED_VPC = [
    "vpc.id=vpc-0123456789abcdef0",
    "vpc.subnets=[subnet-0123456789abcdef0,subnet-0123456789abcdef1]",
]
# actions AWS offers no resource level for (the only ones allowed on Resource "*")
NO_RESOURCE_LEVEL = {
    "ecr:GetAuthorizationToken",
    "cloudwatch:PutMetricData",
    "ec2:DescribeNetworkInterfaces",  # the server waits for its fixed interface
    "ec2:DescribeInstances",  # a client takes over a slot whose holder is gone
}


def settings(*more: str, name: str = "tpl"):
    return stack.load_settings([f"name={name}", f"region={REGION}", "ami=ami-12345678", *more])


def resources(tpl: dict, kind: str) -> dict[str, dict]:
    return {k: r for k, r in tpl["Resources"].items() if r["Type"] == kind}


def sub_text(value) -> str:
    """The text of an ``Fn::Sub`` (string or list form), or the string itself."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        s = value["Fn::Sub"]
        return s[0] if isinstance(s, list) else s
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.parametrize(
    "options",
    [[], ALL_OPTIONS, ["clients.spot=false", *REUSED_VPC], ["ami=resolve:ssm:/aws/x/y"]],
    ids=["defaults", "all-options", "on-demand-reused-vpc", "ami-parameter"],
)
def test_cfn_lint_finds_nothing(options):
    from cfnlint.api import ManualArgs, lint

    body = json.dumps(template.template(settings(*options)))
    found = lint(body, config=ManualArgs(regions=[REGION]))
    assert [f"{m.rule.id} {m.message}" for m in found] == []
    assert len(body) < 51_200  # create_stack's TemplateBody limit (beyond it: an S3 URL)


def test_least_privilege_holds_on_the_template():
    tpl = template.template(settings(*ALL_OPTIONS))
    roles = resources(tpl, "AWS::IAM::Role")
    assert set(roles) == {"ServerRole", "ClientRole"}
    for logical, role in roles.items():
        own = "server" if logical == "ServerRole" else "client"
        props = role["Properties"]
        assert "ManagedPolicyArns" not in props  # no AmazonSSMManagedInstanceCore
        [inline] = props["Policies"]
        for st in inline["PolicyDocument"]["Statement"]:
            assert st["Effect"] == "Allow"
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert not any("*" in a for a in actions), st
            targets = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            if "*" in targets:
                assert set(actions) <= NO_RESOURCE_LEVEL | set(iam.SESSION_MANAGER), st
            if any(a.startswith("ssm:") and "Parameter" in a for a in actions):
                for t in targets:
                    arn = sub_text(t)
                    assert arn != "*", st
                    assert re.fullmatch(
                        r"arn:\$\{AWS::Partition\}:ssm:\$\{AWS::Region\}:\$\{AWS::AccountId\}:"
                        rf"parameter/fedyolo/tpl/{own}/[\w/*.-]+",
                        arn,
                    ), arn
        # a client may read or claim nothing of the server's, and the reverse
        text = json.dumps(inline)
        other = "client" if own == "server" else "server"
        assert f"/fedyolo/tpl/{other}/" not in text
    assert "arn:aws:iam::aws:policy" not in json.dumps(tpl)


def _statements(tpl: dict, logical: str) -> dict[str, dict]:
    [inline] = tpl["Resources"][logical]["Properties"]["Policies"]
    return {st["Sid"]: st for st in inline["PolicyDocument"]["Statement"]}


def test_each_role_reads_only_its_data_prefix_and_the_server_its_state():
    tpl = template.template(settings())
    client, server = _statements(tpl, "ClientRole"), _statements(tpl, "ServerRole")
    s3 = {sid: st for sid, st in client.items() if any(a.startswith("s3:") for a in st["Action"])}
    assert set(s3) == {"ListSlotData", "ReadSlotData"}  # read-only, nothing else of the bucket
    assert s3["ReadSlotData"]["Action"] == ["s3:GetObject"]
    assert sub_text(s3["ReadSlotData"]["Resource"]) == "${StateBucket.Arn}/data/slot-*"
    assert s3["ListSlotData"]["Condition"] == {"StringLike": {"s3:prefix": ["data/slot-*"]}}
    assert server["ReadServerData"]["Action"] == ["s3:GetObject"]
    assert sub_text(server["ReadServerData"]["Resource"]) == "${StateBucket.Arn}/data/server/*"
    assert sub_text(server["State"]["Resource"]) == "${StateBucket.Arn}/state/*"
    assert set(server["State"]["Action"]) == {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    for st in [*client.values(), *server.values()]:
        assert "data/server" not in json.dumps(st) or st["Sid"].endswith("ServerData"), st


def test_groups_wait_at_zero_until_the_images_exist():
    cfg = settings()
    waiting = template.template(cfg, sized=False)["Resources"]
    sized = template.template(cfg)["Resources"]
    for logical, want in (("ServerGroup", ("1", "1", "1")), ("ClientGroup", ("1", "2", "4"))):
        got = [sized[logical]["Properties"][k] for k in ("MinSize", "DesiredCapacity", "MaxSize")]
        assert tuple(got) == want
        props = waiting[logical]["Properties"]
        assert (props["MinSize"], props["DesiredCapacity"]) == ("0", "0")
        assert props["MaxSize"] == want[2]


def test_network_and_instances_are_locked_down():
    for options in ([], ALL_OPTIONS):
        tpl = template.template(settings(*options))
        text = json.dumps(tpl)
        assert "9093" not in text  # Flower 1.41: Fleet and Control on one port
        sgs = resources(tpl, "AWS::EC2::SecurityGroup")
        assert "SecurityGroupIngress" not in sgs["ClientsSecurityGroup"]["Properties"]
        rules = sgs["ServerSecurityGroup"]["Properties"]["SecurityGroupIngress"]
        assert {(r["FromPort"], r["ToPort"]) for r in rules} == {(9092, 9092)}
        assert [r["SourceSecurityGroupId"] for r in rules if "SourceSecurityGroupId" in r] == [
            {"Ref": "ClientsSecurityGroup"}
        ]
        cidrs = [r["CidrIp"] for r in rules if "CidrIp" in r]
        assert cidrs == (["203.0.113.7/32"] if options else [])  # operators only if configured
        assert not resources(tpl, "AWS::EC2::SecurityGroupIngress")
        assert "0.0.0.0/0" not in json.dumps(sgs) and "::/0" not in json.dumps(sgs)
        for logical, lt in resources(tpl, "AWS::EC2::LaunchTemplate").items():
            data = lt["Properties"]["LaunchTemplateData"]
            assert data["MetadataOptions"]["HttpTokens"] == "required"
            # the server's container uses the instance role (S3 state, SSM state key, metrics)
            # through Docker's bridge: one hop more; no client container may reach it
            hops = 2 if logical == "ServerLaunchTemplate" else 1
            assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == hops
            assert all(b["Ebs"]["Encrypted"] for b in data["BlockDeviceMappings"])
            script, values = data["UserData"]["Fn::Base64"]["Fn::Sub"]
            # every ${...} is bash's (escaped ${!...}) but the four CloudFormation fills in
            assert set(re.findall(r"\$\{(?!!)([^}]*)\}", script)) == set(values)
            assert "PRIVATE KEY" not in script


def test_state_bucket_is_kept_and_versioned():
    tpl = template.template(settings())
    [bucket] = resources(tpl, "AWS::S3::Bucket").values()
    assert bucket["DeletionPolicy"] == "Retain" and bucket["UpdateReplacePolicy"] == "Retain"
    props = bucket["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert all(props["PublicAccessBlockConfiguration"].values())
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    [policy] = resources(tpl, "AWS::S3::BucketPolicy").values()
    [deny] = policy["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"]["Bool"]["aws:SecureTransport"] == "false"


def test_registries_logs_alarms_budget_and_spot():
    tpl = template.template(settings())
    for repo in resources(tpl, "AWS::ECR::Repository").values():
        rules = json.loads(repo["Properties"]["LifecyclePolicy"]["LifecyclePolicyText"])["rules"]
        assert rules[-1]["selection"]["countNumber"] == 10
    [logs] = resources(tpl, "AWS::Logs::LogGroup").values()
    assert logs["Properties"]["RetentionInDays"] == 30
    alarms = resources(tpl, "AWS::CloudWatch::Alarm")
    assert len(alarms) == 3
    assert all(a["Properties"]["AlarmActions"] == [{"Ref": "AlarmTopic"}] for a in alarms.values())
    assert not resources(tpl, "AWS::AutoScaling::ScalingPolicy")  # no ratchet to clients.max
    assert not resources(tpl, "AWS::Budgets::Budget")
    assert not resources(tpl, "AWS::SNS::Subscription")
    clients = tpl["Resources"]["ClientGroup"]["Properties"]
    assert clients["CapacityRebalance"] is True
    types = clients["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]
    assert len(types) >= 3 and types[0] == {"InstanceType": "c7i.xlarge"}
    assert (clients["MinSize"], clients["DesiredCapacity"], clients["MaxSize"]) == ("1", "2", "4")
    assert {"Key": TAG, "Value": "tpl", "PropagateAtLaunch": True} in clients["Tags"]

    tpl = template.template(settings(*ALL_OPTIONS, "clients.spot=false"))
    [budget] = resources(tpl, "AWS::Budgets::Budget").values()
    assert budget["Properties"]["Budget"]["BudgetLimit"] == {"Amount": 50.0, "Unit": "USD"}
    [email] = resources(tpl, "AWS::SNS::Subscription").values()
    assert email["Properties"]["Endpoint"] == "ops@example.com"
    clients = tpl["Resources"]["ClientGroup"]["Properties"]
    assert "MixedInstancesPolicy" not in clients and "LaunchTemplate" in clients


def test_arm64_clients_boot_an_arm64_ami_and_the_server_stays_x86_64():
    tpl = template.template(settings())
    assert set(tpl["Parameters"]) == {"Ami"}  # one AMI for both roles by default
    tpl = template.template(settings("clients.arch=arm64", "clients.instance_type=c7g.xlarge"))
    assert tpl["Parameters"]["ClientAmi"]["Default"].endswith("al2023-ami-kernel-default-arm64")
    assert tpl["Parameters"]["Ami"]["Default"] == str(settings().ami)  # the server's
    lt = {r: tpl["Resources"][f"{r}LaunchTemplate"]["Properties"]["LaunchTemplateData"]
          for r in ("Server", "Client")}  # fmt: skip
    assert lt["Client"]["ImageId"] == {"Ref": "ClientAmi"}
    assert lt["Server"]["ImageId"] == {"Ref": "Ami"}
    # the arm64 client's own tag in the (immutable-tag) repository: never the x86_64 image
    from importlib.metadata import version

    from deploy.aws.cfn.compute import _image

    arm = settings("clients.arch=arm64")
    assert _image(arm, "client")["Fn::Join"][1][1] == f"{version('fedyolo')}-arm64"
    assert _image(arm, "server")["Fn::Join"][1][1] == version("fedyolo")
    given = template.template(settings("clients.arch=arm64", "clients.ami=ami-0123456789abcdef0"))
    assert given["Parameters"]["ClientAmi"]["Default"] == "ami-0123456789abcdef0"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("vpc.cidr=10.42.0.0/33", "vpc.cidr"),
        ("vpc.cidr=not-a-cidr", "vpc.cidr"),
        ("vpc.cidr=10.42.0.0/25", "vpc.cidr"),
        ("operator_cidrs=[203.0.113.7]", None),  # a /32 host is a CIDR: accepted
        ("operator_cidrs=[203.0.113.300/32]", "operator_cidrs[0]"),
        ("operator_cidrs=[0.0.0.0/0]", "operator_cidrs[0]"),
        ("clients.max=0", "clients.max"),
        ("alarms.email=nobody", "alarms.email"),
        ("budget.monthly_usd=-5", "budget.monthly_usd"),
        ("logs.retention_days=31", "logs.retention_days"),
        ("ecr.keep_images=0", "ecr.keep_images"),
        ("server.private_ip=10.42.0.10", None),  # inside the first created /24
        ("server.private_ip=10.42.1.10", "server.private_ip"),  # another subnet
        ("server.private_ip=10.42.0.2", "server.private_ip"),  # AWS's DNS address
        ("server.private_ip=10.42.0.255", "server.private_ip"),  # broadcast
        ("server.private_ip=superlink", "server.private_ip"),
        ("run.name=Fleet/1", "run.name"),
        ("run.overrides=[federation.rounds]", "run.overrides[0]"),
        ("clients.arch=aarch64", "clients.arch"),
    ],
)
def test_a_bad_setting_is_one_line_naming_its_key(override, key):
    more = ["clients.min=0", "clients.desired=0"] if override == "clients.max=0" else []
    if key is None:
        template.template(settings(override, *more))
        return
    with pytest.raises(AwsError) as got:
        settings(override, *more)
    message = str(got.value)
    assert "\n" not in message and f"{key}=" in message, message


def test_the_cli_prints_the_template(capsys):
    from fl_server.cli import main

    assert main(["deploy", "aws", "template", "name=cli1", "ami=ami-12345678"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == template.template(settings(name="cli1"))
    assert main(["deploy", "aws", "template", "vpc.cidr=10.0.0.0/33"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vpc.cidr=" in err


# -- moto's CloudFormation ------------------------------------------------------------------------
PLACEHOLDERS = {  # moto 5.2.5 parses these into nothing (see the module docstring)
    "AWS::CloudWatch::Alarm",
    "AWS::S3::BucketPolicy",
    "AWS::SNS::TopicPolicy",
    "AWS::SNS::Subscription",
    "AWS::Budgets::Budget",
}


@pytest.mark.filterwarnings("ignore:Tried to parse")
def test_moto_creates_the_stack_from_the_template(aws):
    pytest.importorskip("moto")
    cfg = settings(*ALL_OPTIONS, name="cfn1")
    tpl = template.template(cfg)
    cf = aws.client("cloudformation")
    cf.create_stack(
        StackName="cfn1", TemplateBody=json.dumps(tpl), Capabilities=["CAPABILITY_NAMED_IAM"]
    )
    [st] = cf.describe_stacks(StackName="cfn1")["Stacks"]
    assert st["StackStatus"] == "CREATE_COMPLETE"
    reported = {
        r["LogicalResourceId"]: r
        for r in cf.describe_stack_resources(StackName="cfn1")["StackResources"]
        if "LogicalResourceId" in r
    }
    expected = {k: r["Type"] for k, r in tpl["Resources"].items() if r["Type"] not in PLACEHOLDERS}
    assert {k: r["ResourceType"] for k, r in reported.items()} == expected
    assert {r["ResourceStatus"] for r in reported.values()} == {"CREATE_COMPLETE"}
    out = {o["OutputKey"]: o["OutputValue"] for o in st["Outputs"]}

    asg, ec2, roles = aws.client("autoscaling"), aws.client("ec2"), aws.client("iam")
    groups = {
        g["AutoScalingGroupName"]: g
        for g in asg.describe_auto_scaling_groups(
            AutoScalingGroupNames=["cfn1-server", "cfn1-clients"]
        )["AutoScalingGroups"]
    }
    assert (groups["cfn1-server"]["MinSize"], groups["cfn1-server"]["MaxSize"]) == (1, 1)
    mixed = groups["cfn1-clients"]["MixedInstancesPolicy"]
    assert len(mixed["LaunchTemplate"]["Overrides"]) == 4
    assert mixed["InstancesDistribution"]["OnDemandBaseCapacity"] == 1

    [server_sg] = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["cfn1-server-sg"]}]
    )["SecurityGroups"]
    [rule] = server_sg["IpPermissions"]
    assert (rule["FromPort"], rule["ToPort"]) == (9092, 9092)
    assert [r["CidrIp"] for r in rule["IpRanges"]] == ["203.0.113.7/32"]

    for role in ("server", "client"):
        lt = ec2.describe_launch_template_versions(LaunchTemplateName=f"cfn1-{role}")[
            "LaunchTemplateVersions"
        ][0]["LaunchTemplateData"]
        assert lt["MetadataOptions"]["HttpPutResponseHopLimit"] == (2 if role == "server" else 1)
        script = base64.b64decode(lt["UserData"]).decode()
        assert f'SERVER_IP="{out["ServerPrivateIp"]}"' in script
        assert f'IMAGE="{out[f"{role.capitalize()}RepositoryUri"]}:' in script
        assert f'STATE_URL="s3://{out["StateBucket"]}/state"' in script
        assert 'LOG_GROUP="/fedyolo/${DEPLOYMENT}"' in script  # bash's, left alone
        name = f"cfn1-{role}"
        assert roles.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []
        assert roles.list_role_policies(RoleName=name)["PolicyNames"] == ["fedyolo"]
    assert out["StateBucket"] == f"cfn1-state-123456789012-{REGION}"
    logs = aws.client("logs").describe_log_groups(logGroupNamePrefix="/fedyolo/cfn1")
    assert [g.get("retentionInDays") for g in logs["logGroups"]] == [30]


def test_each_role_reads_the_parameters_up_writes_for_it_and_no_others():
    """The parameter layout ``up`` writes (``stack.parameter_names``) against the template's
    grants and the boot script's reads: every name is under one role's prefix, and the script
    reads only its own role's (plus the claims and the state key it is granted)."""
    cfg = settings()
    names = stack.parameter_names(stack.Context(cfg, None))
    assert all(n.startswith(("/fedyolo/tpl/server/", "/fedyolo/tpl/client/")) for n in names)
    client = [n for n in names if n.startswith("/fedyolo/tpl/client/")]
    assert set(client) == {"/fedyolo/tpl/client/tls/ca.crt"} | {
        f"/fedyolo/tpl/client/slots/{i}/key" for i in range(4)
    }
    tpl = template.template(cfg)
    for role in ("server", "client"):
        data = tpl["Resources"][f"{role.capitalize()}LaunchTemplate"]["Properties"]
        script = data["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"][0]
        paths = set(re.findall(r"/fedyolo/\$\{!DEPLOYMENT\}/([^\s\")]+)", script))
        own = {  # besides param(): this role's prefix (each role's user data has its branch)
            "server": {"server/state/key"},  # the server containers' FEDYOLO_STATE_KEY_PARAMETER
            "client": {"client/claims/${!i}", "client/claims/", "client/claims/${!SLOT}"},
        }
        assert paths == {"${!ROLE}/$1"} | own[role]


@pytest.mark.filterwarnings("ignore:Tried to parse")
def test_moto_deletes_the_stack_but_keeps_the_state_bucket(aws):
    """In a VPC of yours (moto's ``delete_stack`` stops on a created VPC: its placeholder
    instances' interfaces stay behind), deleting the stack keeps only the bucket (Retain)."""
    ec2 = aws.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone="eu-west-1a")
    cfg = settings(f"vpc.id={vpc}", f"vpc.subnets=[{subnet['Subnet']['SubnetId']}]", name="del1")
    tpl = template.template(cfg)
    assert not resources(tpl, "AWS::EC2::VPC")
    cf = aws.client("cloudformation")
    cf.create_stack(
        StackName="del1", TemplateBody=json.dumps(tpl), Capabilities=["CAPABILITY_NAMED_IAM"]
    )
    cf.delete_stack(StackName="del1")
    asg = aws.client("autoscaling")
    assert (
        asg.describe_auto_scaling_groups(AutoScalingGroupNames=["del1-server", "del1-clients"])[
            "AutoScalingGroups"
        ]
        == []
    )
    roles = [r["RoleName"] for r in aws.client("iam").list_roles()["Roles"]]
    assert not [r for r in roles if r.startswith("del1-")]
    buckets = [b["Name"] for b in aws.client("s3").list_buckets()["Buckets"]]
    assert f"del1-state-123456789012-{REGION}" in buckets


CHECKOV = Path(__file__).resolve().parents[2] / ".venv-checkov" / "bin" / "checkov"


@pytest.mark.parametrize(
    "options",
    [[], [*ALL_OPTIONS, "server.private_ip=10.42.0.10"], ["clients.spot=false", *REUSED_VPC]],
    ids=["defaults", "all-options", "on-demand-reused-vpc"],
)
def test_checkov_accepts_the_template(options, tmp_path):
    """checkov in its own venv (its pins are not fedyolo's): every finding is fixed or skipped
    in the resource's Metadata with a reason (``deploy.aws.cfn.checkov_skip``)."""
    import os
    import subprocess

    if not CHECKOV.exists():
        if os.environ.get("FEDYOLO_REQUIRE_CHECKOV") == "1":
            pytest.fail(
                f"checkov is required here (FEDYOLO_REQUIRE_CHECKOV) but {CHECKOV} is absent"
            )
        pytest.skip("checkov not installed: `make checkov` (.venv-checkov)")
    body = tmp_path / "fleet.json"
    body.write_text(json.dumps(template.template(settings(*options))))
    done = subprocess.run(
        [
            str(CHECKOV),
            "--skip-download",
            "-f",
            str(body),
            "--framework",
            "cloudformation",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(done.stdout)
    failed = [f"{c['check_id']} {c['resource']}" for c in report["results"]["failed_checks"]]
    assert failed == [] and done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
    assert skipped == {"CKV_AWS_18", "CKV_AWS_136", "CKV_AWS_158", "CKV_AWS_26"}
    assert report["summary"]["passed"] > 40
