"""CloudWatch: the server's per-round metrics, the alarms on them, a dashboard.

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

The alarms notify the stack's SNS topic (``deploy.aws.cfn.alarms``). **No scaling policy**: a
client holds a data shard (its key slot is its partition), so the desired count is the number of
data holders (``clients.desired``, changed with ``fedyolo deploy aws scale``), and the group only
replaces a lost client. A "+1 client per few-clients alarm" step never scaled in and ratcheted
to ``clients.max``; CPU target tracking would scale in between rounds, when clients idle.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from deploy.aws import TAG

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


__all__ = ["TAG", "RoundMetrics", "alarms", "dashboard", "latest", "publish"]
