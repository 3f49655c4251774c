"""CloudWatch: the server's per-round metrics, the alarms on them, a dashboard, client scaling.

**Metrics** (namespace ``fedyolo``, dimension ``Deployment=<name>``), one data point per finished
round, published by the round hook :class:`RoundMetrics` in the ServerApp's process
(``hooks=[deploy.aws.cloudwatch:RoundMetrics]``; the deployment name comes from
``FEDYOLO_AWS_DEPLOYMENT``, which the server's user data sets):

=================  ===========  ====================================================
metric             unit         value
=================  ===========  ====================================================
Round              None         the round number
RoundsCompleted    Count        1 per finished round (the "no round" alarm sums it)
RoundSeconds       Seconds      the round's wall time
ClientsSampled     Count        replies expected (good + failed)
ClientsOk          Count        good replies aggregated
ClientsFailed      Count        failures recorded in the round
GlobalMap50_95     None         the global model's mAP50-95 on the held-out set
BytesDown          Bytes        sum over clients of the messages sent
BytesUp            Bytes        sum over clients of the replies
Rollbacks          Count        1 when the drift guard rolled the round back
=================  ===========  ====================================================

**Alarms**: no round finished in ``alarms.no_round_minutes`` (missing data is breaching);
fewer than ``alarms.min_clients`` good replies in a round; any rollback.

**Client scaling**: a step policy on the clients' group, triggered by the "fewer clients" alarm,
adds one client (up to ``clients.max``). Not CPU target tracking: a federated client is idle
between rounds and busy during them, so CPU tracking would scale in between rounds and take
clients out of the next one; the federation's own signal is how many clients answered.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from deploy.aws import TAG, Resource

LOGGER = logging.getLogger("fedyolo")
NAMESPACE = "fedyolo"


def round_metrics(record: dict) -> list[tuple[str, float, str]]:
    """(name, value, unit) of one metrics.jsonl record."""
    clients = record.get("clients") or []
    failed = int(record.get("failures", 0))
    rolled = bool((record.get("guard") or {}).get("rolled_back"))
    return [
        ("Round", float(record["round"]), "None"),
        ("RoundsCompleted", 1.0, "Count"),
        ("RoundSeconds", float(record.get("round_seconds", 0.0)), "Seconds"),
        ("ClientsSampled", float(len(clients) + failed), "Count"),
        ("ClientsOk", float(len(clients)), "Count"),
        ("ClientsFailed", float(failed), "Count"),
        ("GlobalMap50_95", float(record.get("map50_95", 0.0)), "None"),
        ("BytesDown", float(sum(c.get("bytes_down", 0) for c in clients)), "Bytes"),
        ("BytesUp", float(sum(c.get("bytes_up", 0) for c in clients)), "Bytes"),
        ("Rollbacks", 1.0 if rolled else 0.0, "Count"),
    ]


def publish(cw: Any, deployment: str, record: dict) -> None:
    dims = [{"Name": "Deployment", "Value": deployment}]
    cw.put_metric_data(
        Namespace=NAMESPACE,
        MetricData=[
            {"MetricName": n, "Dimensions": dims, "Value": v, "Unit": u}
            for n, v, u in round_metrics(record)
        ],
    )


class RoundMetrics:
    """Round hook: publish each finished round to CloudWatch. A failure to publish is logged and
    costs nothing else (never the round)."""

    def __init__(self, run_dir: Any = None, deployment: str | None = None, client: Any = None):
        self.deployment = deployment or os.environ.get("FEDYOLO_AWS_DEPLOYMENT", "")
        self._cw = client

    def _client(self):
        if self._cw is None:
            import boto3

            self._cw = boto3.client("cloudwatch")
        return self._cw

    def on_round(self, record: dict) -> None:
        if not self.deployment:
            LOGGER.warning("CloudWatch: FEDYOLO_AWS_DEPLOYMENT is not set; round not published")
            return None
        try:
            publish(self._client(), self.deployment, record)
        except Exception as e:  # noqa: BLE001 - metrics never cost the round
            LOGGER.warning("CloudWatch: round %s not published: %s", record.get("round"), e)
        return None


def latest(ctx: Any) -> dict:
    """The last published round and global mAP50-95 (last 24 h), read back from CloudWatch."""
    cw = ctx.client("cloudwatch")
    end = time.time()
    out: dict[str, Any] = {}
    for metric, key in (("Round", "round"), ("GlobalMap50_95", "map50_95")):
        points = cw.get_metric_statistics(
            Namespace=NAMESPACE,
            MetricName=metric,
            Dimensions=[{"Name": "Deployment", "Value": ctx.name}],
            StartTime=end - 86400,
            EndTime=end + 60,
            Period=60,
            Statistics=["Maximum"],
        )["Datapoints"]
        last = max(points, key=lambda p: p["Timestamp"]) if points else None
        out[key] = None if last is None else last["Maximum"]
        if last is not None:
            out[f"{key}_at"] = last["Timestamp"].isoformat()
    return out


def alarms(ctx: Any) -> list[dict]:
    """The alarms' definitions (put_metric_alarm arguments)."""
    name, a = ctx.name, ctx.cfg.alarms
    dims = [{"Name": "Deployment", "Value": name}]
    base = {"Namespace": NAMESPACE, "Dimensions": dims, "Tags": ctx.tags()}
    minutes = int(a.no_round_minutes)
    return [
        {
            **base,
            "AlarmName": f"{name}-no-round",
            "AlarmDescription": f"no federated round finished in {minutes} minutes",
            "MetricName": "RoundsCompleted",
            "Statistic": "Sum",
            "Period": 60 * minutes,
            "EvaluationPeriods": 1,
            "Threshold": 1.0,
            "ComparisonOperator": "LessThanThreshold",
            "TreatMissingData": "breaching",
        },
        {
            **base,
            "AlarmName": f"{name}-few-clients",
            "AlarmDescription": f"fewer than {int(a.min_clients)} clients answered a round",
            "MetricName": "ClientsOk",
            "Statistic": "Minimum",
            "Period": 300,
            "EvaluationPeriods": 1,
            "Threshold": float(a.min_clients),
            "ComparisonOperator": "LessThanThreshold",
            "TreatMissingData": "notBreaching",
        },
        {
            **base,
            "AlarmName": f"{name}-rollback",
            "AlarmDescription": "the drift guard rolled a round back (mAP drop > 10%)",
            "MetricName": "Rollbacks",
            "Statistic": "Sum",
            "Period": 300,
            "EvaluationPeriods": 1,
            "Threshold": 1.0,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "TreatMissingData": "notBreaching",
        },
    ]


def dashboard(ctx: Any) -> dict:
    def widget(title: str, metrics: list[str], x: int, y: int) -> dict:
        return {
            "type": "metric",
            "x": x,
            "y": y,
            "width": 12,
            "height": 6,
            "properties": {
                "title": title,
                "region": str(ctx.cfg.region),
                "metrics": [[NAMESPACE, m, "Deployment", ctx.name] for m in metrics],
                "stat": "Maximum",
                "period": 60,
            },
        }

    return {
        "widgets": [
            widget("global mAP50-95 (held-out)", ["GlobalMap50_95"], 0, 0),
            widget("round", ["Round", "RoundSeconds"], 12, 0),
            widget("clients", ["ClientsSampled", "ClientsOk", "ClientsFailed"], 0, 6),
            widget("bytes", ["BytesDown", "BytesUp"], 12, 6),
            widget("rollbacks", ["Rollbacks"], 0, 12),
        ]
    }


def resources() -> list:
    def find_policy(ctx):
        got = ctx.client("autoscaling").describe_policies(
            AutoScalingGroupName=f"{ctx.name}-clients", PolicyNames=[f"{ctx.name}-add-client"]
        )["ScalingPolicies"]
        return got[0]["PolicyARN"] if got else None

    def create_policy(ctx):
        ctx.client("autoscaling").put_scaling_policy(
            AutoScalingGroupName=f"{ctx.name}-clients",
            PolicyName=f"{ctx.name}-add-client",
            PolicyType="StepScaling",
            AdjustmentType="ChangeInCapacity",
            StepAdjustments=[{"MetricIntervalUpperBound": 0.0, "ScalingAdjustment": 1}],
        )
        return find_policy(ctx)  # moto's reply lacks the ARN; AWS's has it

    def delete_policy(ctx, _arn):
        ctx.client("autoscaling").delete_policy(
            AutoScalingGroupName=f"{ctx.name}-clients", PolicyName=f"{ctx.name}-add-client"
        )

    def find_alarms(ctx):
        names = [a["AlarmName"] for a in alarms(ctx)]
        got = ctx.client("cloudwatch").describe_alarms(AlarmNames=names)["MetricAlarms"]
        return sorted(a["AlarmName"] for a in got) or None

    def create_alarms(ctx):
        cw = ctx.client("cloudwatch")
        for a in alarms(ctx):
            if a["AlarmName"].endswith("-few-clients"):
                a = {**a, "AlarmActions": [ctx.ids["add-client"]]}
            cw.put_metric_alarm(**a)
        return sorted(a["AlarmName"] for a in alarms(ctx))

    def delete_alarms(ctx, names):
        ctx.client("cloudwatch").delete_alarms(AlarmNames=list(names))

    def find_dashboard(ctx):
        got = ctx.client("cloudwatch").list_dashboards(DashboardNamePrefix=ctx.name)
        return next(
            (d["DashboardName"] for d in got["DashboardEntries"] if d["DashboardName"] == ctx.name),
            None,
        )

    def create_dashboard(ctx):
        ctx.client("cloudwatch").put_dashboard(
            DashboardName=ctx.name, DashboardBody=json.dumps(dashboard(ctx))
        )
        return ctx.name

    def delete_dashboard(ctx, name):
        ctx.client("cloudwatch").delete_dashboards(DashboardNames=[name])

    return [
        Resource("scaling-policy", "add-client", find_policy, create_policy, delete_policy),
        Resource("cloudwatch-alarms", "alarms", find_alarms, create_alarms, delete_alarms),
        Resource("dashboard", "dashboard", find_dashboard, create_dashboard, delete_dashboard),
    ]


__all__ = ["TAG", "RoundMetrics", "alarms", "dashboard", "latest", "publish", "resources"]
