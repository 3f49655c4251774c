"""Alarms: an SNS topic (an email subscription optional), the federation's CloudWatch alarms
and dashboard (defined in ``deploy.aws.cloudwatch``), and a monthly cost budget if configured.

Every alarm notifies the topic; none scales the clients' group (the step policy of ``stack.py``
added a client per "few clients" alarm and never removed one: a ratchet to ``clients.max``).
The budget filters costs by the ``fedyolo:deployment`` tag, which counts only once that tag is
activated as a cost allocation tag in the account's Billing console.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from deploy.aws import TAG, cloudwatch
from deploy.aws.cfn import checkov_skip, name, ref, sub, tags

_ALARM_KEYS = (
    "AlarmName",
    "AlarmDescription",
    "Namespace",
    "MetricName",
    "Dimensions",
    "Statistic",
    "Period",
    "EvaluationPeriods",
    "Threshold",
    "ComparisonOperator",
    "TreatMissingData",
)


def _view(cfg: Any) -> Any:
    """What ``deploy.aws.cloudwatch``'s definitions read of a ``stack.Context``."""
    return SimpleNamespace(name=name(cfg), cfg=cfg, tags=lambda **kw: tags(cfg, **kw))


def topic(cfg: Any) -> dict:
    out: dict[str, Any] = {
        "AlarmTopic": {
            "Type": "AWS::SNS::Topic",
            "Metadata": checkov_skip(
                CKV_AWS_26="alarm names only; CloudWatch cannot publish to a topic encrypted with "
                "the AWS-managed SNS key, and a customer key costs a monthly fee"
            ),
            "Properties": {"TopicName": f"{name(cfg)}-alarms", "Tags": tags(cfg)},
        },
        "AlarmTopicPolicy": {  # CloudWatch alarms and AWS Budgets of this account may publish
            "Type": "AWS::SNS::TopicPolicy",
            "Properties": {
                "Topics": [ref("AlarmTopic")],
                "PolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Sid": "AlarmsAndBudgets",
                            "Effect": "Allow",
                            "Principal": {
                                "Service": ["cloudwatch.amazonaws.com", "budgets.amazonaws.com"]
                            },
                            "Action": "sns:Publish",
                            "Resource": ref("AlarmTopic"),
                            "Condition": {
                                "StringEquals": {"aws:SourceAccount": sub("${AWS::AccountId}")}
                            },
                        }
                    ],
                },
            },
        },
    }
    if cfg.alarms.email:
        out["AlarmEmail"] = {
            "Type": "AWS::SNS::Subscription",
            "Properties": {
                "TopicArn": ref("AlarmTopic"),
                "Protocol": "email",
                "Endpoint": str(cfg.alarms.email),
            },
        }
    return out


def alarms(cfg: Any) -> dict:
    out = {}
    for a in cloudwatch.alarms(_view(cfg)):
        short = a["AlarmName"].removeprefix(f"{name(cfg)}-")
        logical = "Alarm" + "".join(w.capitalize() for w in short.split("-"))
        props = {k: a[k] for k in _ALARM_KEYS if k in a}
        props["AlarmActions"] = [ref("AlarmTopic")]
        out[logical] = {"Type": "AWS::CloudWatch::Alarm", "Properties": props}
    out["Dashboard"] = {
        "Type": "AWS::CloudWatch::Dashboard",
        "Properties": {
            "DashboardName": name(cfg),
            "DashboardBody": json.dumps(cloudwatch.dashboard(_view(cfg))),
        },
    }
    return out


def budget(cfg: Any) -> dict:
    usd = cfg.budget.monthly_usd
    if usd is None:
        return {}

    def notify(kind: str, percent: int) -> dict:
        return {
            "Notification": {
                "NotificationType": kind,
                "ComparisonOperator": "GREATER_THAN",
                "Threshold": percent,
                "ThresholdType": "PERCENTAGE",
            },
            "Subscribers": [{"SubscriptionType": "SNS", "Address": ref("AlarmTopic")}],
        }

    return {
        "Budget": {
            "Type": "AWS::Budgets::Budget",
            "DependsOn": ["AlarmTopicPolicy"],
            "Properties": {
                "Budget": {
                    "BudgetName": f"{name(cfg)}-monthly",
                    "BudgetType": "COST",
                    "TimeUnit": "MONTHLY",
                    "BudgetLimit": {"Amount": float(usd), "Unit": "USD"},
                    "CostFilters": {"TagKeyValue": [f"user:{TAG}${name(cfg)}"]},
                },
                "NotificationsWithSubscribers": [notify("ACTUAL", 80), notify("FORECASTED", 100)],
            },
        }
    }


def outputs(cfg: Any) -> dict:
    return {"AlarmTopic": {"Value": ref("AlarmTopic")}}
