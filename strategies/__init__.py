"""Aggregation strategies, selected by name in config (``strategy.name``).

``build_strategy(cfg)`` returns a Flower Message-API strategy. The registry maps a config name
to a factory taking the run's config; the strategies issue extends it with the rest of Flower's
strategies, our YOLO-aware ones and plug-ins by import path.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAvg, Strategy
from omegaconf import DictConfig


def _fedavg(cfg: DictConfig) -> Strategy:
    clients = int(cfg.federation.clients)
    return FedAvg(
        fraction_train=float(cfg.federation.fraction),
        fraction_evaluate=float(cfg.federation.fraction_evaluate),
        # Wait for the whole fleet before round 1; sample at least one client per round.
        min_available_nodes=clients,
        min_train_nodes=max(1, int(clients * float(cfg.federation.fraction))),
        min_evaluate_nodes=max(1, int(clients * float(cfg.federation.fraction_evaluate))),
    )


REGISTRY: dict[str, Callable[[DictConfig], Strategy]] = {"fedavg": _fedavg}


def build_strategy(cfg: DictConfig) -> Strategy:
    """The strategy named by ``cfg.strategy.name``, configured from ``cfg``."""
    name = str(cfg.strategy.name)
    if name not in REGISTRY:
        raise ValueError(f"strategy.name={name!r} is unknown; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](cfg)


__all__ = ["REGISTRY", "build_strategy"]
