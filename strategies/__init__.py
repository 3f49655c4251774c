"""Aggregation strategies, selected by name in config (``strategy=<name>``).

``build_strategy(cfg)`` returns the run's strategy: one of Flower's Message-API strategies or
fedyolo's YOLO-aware presets from ``REGISTRY`` (or a user's class by import path, ``_target_``),
optionally wrapped in one of Flower's differential-privacy wrappers, and always wrapped in
``GuardedStrategy`` (minimum good replies, example-weight capping, BatchNorm statistics;
the whole story of a bad update: ``strategies.guarded``).
"""

from strategies.guarded import AggregationPolicy, GuardedStrategy
from strategies.registry import REGISTRY, StrategyConfigError, build_strategy, describe

__all__ = [
    "REGISTRY",
    "AggregationPolicy",
    "GuardedStrategy",
    "StrategyConfigError",
    "build_strategy",
    "describe",
]
