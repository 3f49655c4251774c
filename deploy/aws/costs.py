"""What the stack costs per month: every billed item, priced from ``prices`` in the settings.

The prices are list prices written from memory, never checked from this machine (it reaches no
price page): every row says ``unverified``. Instances are counted at the live groups' desired
counts when the stack exists (what is running), else at the configured ones. Usage-priced items
(logs, images, state) use ``estimates``. No NAT gateway: the subnets are public, so every
instance has a public IPv4 address, which AWS bills by the hour.
"""

from __future__ import annotations

from typing import Any

from deploy.aws.cloudwatch import round_metrics

HOURS = 730  # a month


def _row(item: str, quantity: float, unit: str, price: float, usd: float) -> dict:
    return {
        "item": item,
        "quantity": quantity,
        "unit": unit,
        "price": price,
        "usd_month": round(usd, 2),
        "verified": False,
    }


def rows(cfg: Any, counts: dict[str, int]) -> list[dict]:
    """``counts``: instances per role (``server``, ``client``), live or configured."""
    p, c, s = cfg.prices, cfg.clients, cfg.server
    n_server, n_client = int(counts["server"]), int(counts["client"])
    base = min(n_client, int(c.on_demand_base)) if c.spot else n_client
    spot = n_client - base
    server_hour = float(p.get(str(s.instance_type), 0.0))
    client_hour = float(p.get(str(c.instance_type), 0.0))
    gb = n_server * int(s.volume_gb) + n_client * int(c.volume_gb)
    metrics = len(round_metrics({"round": 0}))
    est = cfg.estimates
    out = [
        _row(
            f"server {s.instance_type}",
            n_server,
            "instance-h",
            server_hour,
            n_server * server_hour * HOURS,
        ),
        _row(
            f"clients {c.instance_type} on-demand",
            base,
            "instance-h",
            client_hour,
            base * client_hour * HOURS,
        ),
        _row(
            f"clients spot (~{float(p.spot_factor):.0%} of on-demand)",
            spot,
            "instance-h",
            client_hour * float(p.spot_factor),
            spot * client_hour * float(p.spot_factor) * HOURS,
        ),
        _row(
            "EBS gp3 root volumes",
            gb,
            "GB-month",
            float(p.ebs_gb_month),
            gb * float(p.ebs_gb_month),
        ),
        _row(
            "public IPv4 addresses",
            n_server + n_client,
            "address-h",
            float(p.public_ipv4_hour),
            (n_server + n_client) * float(p.public_ipv4_hour) * HOURS,
        ),
        _row(
            "CloudWatch custom metrics",
            metrics,
            "metric-month",
            float(p.metric_month),
            metrics * float(p.metric_month),
        ),
        _row("CloudWatch alarms", 3, "alarm-month", float(p.alarm_month), 3 * float(p.alarm_month)),
        _row(
            "CloudWatch dashboard",
            1,
            "dashboard-month",
            float(p.dashboard_month),
            float(p.dashboard_month),
        ),
        _row(
            "CloudWatch Logs ingestion (estimate)",
            float(est.logs_gb_month),
            "GB",
            float(p.logs_ingest_gb),
            float(est.logs_gb_month) * float(p.logs_ingest_gb),
        ),
        _row(
            f"ECR storage (at most {int(cfg.ecr.keep_images)} images x 2 repositories)",
            2 * int(cfg.ecr.keep_images) * float(est.image_gb),
            "GB-month",
            float(p.ecr_gb_month),
            2 * int(cfg.ecr.keep_images) * float(est.image_gb) * float(p.ecr_gb_month),
        ),
        _row(
            "S3 state bucket (estimate)",
            float(est.state_gb),
            "GB-month",
            float(p.s3_gb_month),
            float(est.state_gb) * float(p.s3_gb_month),
        ),
        _row("NAT gateway: none (public subnets)", 0, "-", 0.0, 0.0),
    ]
    return out


def total(items: list[dict]) -> float:
    return round(sum(r["usd_month"] for r in items), 2)
