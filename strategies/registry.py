"""The strategy registry: config name → Flower strategy class, with its parameters checked.

Every key of the ``strategy`` config node other than the reserved ones (``name``, ``local``,
``bn_stats``, ``dp``, ``_target_``) is a keyword argument of the strategy's class, e.g.
``fedyolo run strategy=fedadam strategy.eta=0.01``. Keys the class does not take, values of the
wrong type or out of range, and client counts a robust strategy cannot work with are refused
with one line naming the key, when the config is validated, before any round.

Sampling (``fraction_train``, ``min_*_nodes``, ...) comes from ``federation.*`` for every
strategy, so it is set in one place.

A user's own class (``strategy=custom strategy._target_=my_pkg.mod.MyStrategy``) is imported
only when trusted (``fl_server.plugins``: ``--trust-plugin my_pkg.mod:MyStrategy`` on the
command line, or a ``fedyolo.strategies`` entry point of an installed package), and it must be
a Flower ``Strategy`` class before anything is instantiated: a config alone runs no code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import strategy as fl
from omegaconf import DictConfig, OmegaConf

from fl_client.errors import UserError
from fl_client.model import PARTS
from fl_client.wire import LOSS
from fl_server.plugins import STRATEGY, PluginError, load, recorded  # fl_server's floor


class StrategyConfigError(UserError, ValueError):
    """A strategy setting is wrong; the message names the config key."""


@dataclass(frozen=True)
class Entry:
    """A registered strategy."""

    cls: type[fl.Strategy]
    summary: str
    local: tuple[str, ...] = ()  # model parts clients keep local (YOLO-aware presets)
    server_optimizer: bool = False  # the server applies an optimizer to the mean update


REGISTRY: dict[str, Entry] = {
    "fedavg": Entry(fl.FedAvg, "example-weighted mean of the clients' weights"),
    "fedprox": Entry(fl.FedProx, "FedAvg + proximal term µ/2·‖w − w_global‖² in client loss"),
    "fedavgm": Entry(fl.FedAvgM, "FedAvg with server momentum", server_optimizer=True),
    "fedadam": Entry(fl.FedAdam, "Adam on the server over the mean update", server_optimizer=True),
    "fedyogi": Entry(fl.FedYogi, "Yogi on the server over the mean update", server_optimizer=True),
    "fedadagrad": Entry(fl.FedAdagrad, "Adagrad on the server", server_optimizer=True),
    "fedmedian": Entry(fl.FedMedian, "coordinate-wise median (robust)"),
    "fedtrimmedavg": Entry(fl.FedTrimmedAvg, "coordinate-wise trimmed mean (robust)"),
    "krum": Entry(fl.Krum, "the one update closest to its neighbours (robust)"),
    "multikrum": Entry(fl.MultiKrum, "mean of the m best Krum updates (robust)"),
    "bulyan": Entry(fl.Bulyan, "Multi-Krum selection + trimmed mean (robust)"),
    "qfedavg": Entry(fl.QFedAvg, "q-fair FedAvg: more weight to clients with high loss"),
    "fedbn": Entry(fl.FedAvg, "FedAvg; BatchNorm stays local on each client", local=("bn",)),
    "fedpartial": Entry(
        fl.FedAvg, "FedAvg of the shared parts only (default: backbone)", local=("neck", "head")
    ),
}

RESERVED = ("name", "local", "bn_stats", "dp", "_target_")
MANAGED = {  # set from federation.* for every strategy
    "fraction_train": "federation.fraction",
    "fraction_evaluate": "federation.fraction_evaluate",
    "min_train_nodes": "federation.fraction",
    "min_evaluate_nodes": "federation.fraction_evaluate",
    "min_available_nodes": "federation.clients",
}
# fedyolo's wire contract, and Python callables (a plug-in strategy can set those in code)
FIXED = (
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
    "selection_rule",
)

_POS = (lambda v: v > 0, "a number > 0")
_NONNEG = (lambda v: v >= 0, "a number >= 0")
_UNIT = (lambda v: 0 <= v < 1, "a number in [0, 1)")
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "eta": _POS,
    "eta_l": _POS,
    "tau": _POS,
    "server_learning_rate": _POS,
    "client_learning_rate": _POS,
    "clipping_norm": _POS,
    "initial_clipping_norm": _POS,
    "clip_norm_lr": _POS,
    "beta_1": _UNIT,
    "beta_2": _UNIT,
    "server_momentum": _UNIT,
    "target_clipped_quantile": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "beta": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    "proximal_mu": _NONNEG,
    "q": _NONNEG,
    "noise_multiplier": _NONNEG,
    "num_malicious_nodes": _NONNEG,
    "num_nodes_to_select": (lambda v: v >= 1, "an integer >= 1"),
    "clipped_count_stddev": _NONNEG,
}

DP_KINDS: dict[str, type[fl.Strategy]] = {
    "server-fixed": fl.DifferentialPrivacyServerSideFixedClipping,
    "server-adaptive": fl.DifferentialPrivacyServerSideAdaptiveClipping,
    "client-fixed": fl.DifferentialPrivacyClientSideFixedClipping,
    "client-adaptive": fl.DifferentialPrivacyClientSideAdaptiveClipping,
}


def _fail(key: str, message: str) -> StrategyConfigError:
    return StrategyConfigError(f"config: strategy.{key}: {message}")


def _type_ok(value: Any, default: Any) -> bool:
    if default is inspect.Parameter.empty or default is None:
        return isinstance(value, int | float | str | bool) or value is None
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def check_kwargs(
    where: str, target: Callable[..., Any], kwargs: dict[str, Any], skip: tuple[str, ...] = ()
) -> None:
    """Raise StrategyConfigError unless ``kwargs`` fit ``target``'s signature and ``RANGES``."""
    params = {
        n: p
        for n, p in inspect.signature(target).parameters.items()
        if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    name = getattr(target, "__name__", str(target))
    for key, value in kwargs.items():
        full = f"{where}{key}"
        if key in MANAGED:
            raise _fail(full, f"is set by {MANAGED[key]} for every strategy")
        if key in FIXED:
            raise _fail(full, "is fixed by fedyolo (wire format or a Python callable)")
        if key not in params:
            if takes_any:
                continue
            choices = sorted(set(params).difference(MANAGED, FIXED))
            raise _fail(full, f"{name} has no parameter {key!r}; its parameters: {choices}")
        if not _type_ok(value, params[key].default):
            expected = type(params[key].default).__name__
            raise _fail(full, f"{value!r} has the wrong type; expected {expected}")
        if key in RANGES and isinstance(value, int | float) and not RANGES[key][0](value):
            raise _fail(full, f"{value!r} is out of range; expected {RANGES[key][1]}")
    missing = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty and n not in kwargs and n not in MANAGED
    ]
    if missing:
        raise _fail(f"{where}{missing[0]}", f"{name} needs a value (no default)")


def sampled_clients(cfg: DictConfig) -> int:
    """Clients sampled for training each round."""
    return max(1, int(int(cfg.federation.clients) * float(cfg.federation.fraction)))


def _sampling(cfg: DictConfig) -> dict[str, Any]:
    # The server waits for the whole fleet before its first round (fl_server.server_app); after
    # that a round goes ahead with whoever is connected, as long as aggregation.min_replies
    # clients can be sampled: Flower's sampling would otherwise wait for a dead SuperNode forever.
    from strategies.guarded import AggregationPolicy

    least = AggregationPolicy.from_cfg(cfg).min_replies
    return {
        "fraction_train": float(cfg.federation.fraction),
        "fraction_evaluate": float(cfg.federation.fraction_evaluate),
        "min_available_nodes": least,
        "min_train_nodes": least,
        "min_evaluate_nodes": 1,
    }


def _check_robust(name: str, kwargs: dict[str, Any], n: int) -> None:
    f = int(kwargs.get("num_malicious_nodes", 0))
    if name in ("krum", "multikrum") and n < 2 * f + 3:
        raise _fail(
            "num_malicious_nodes",
            f"{name} with f={f} needs at least 2f+3={2 * f + 3} clients per round, has {n}",
        )
    if name == "bulyan" and n < 4 * f + 3:
        raise _fail(
            "num_malicious_nodes",
            f"bulyan with f={f} needs at least 4f+3={4 * f + 3} clients per round, has {n}",
        )
    if name == "multikrum" and int(kwargs.get("num_nodes_to_select", 1)) > n:
        raise _fail("num_nodes_to_select", f"cannot select more than the {n} clients per round")


def _import(path: str, trusted: tuple[str, ...]) -> type[fl.Strategy]:
    """The strategy class at ``path``, imported only if trusted (``fl_server.plugins``) and
    only if it is a Flower Strategy class: nothing from the config is called before that."""
    try:
        return load(path, STRATEGY, trusted, "config: strategy._target_")
    except PluginError as e:
        raise StrategyConfigError(str(e)) from e


def _hydra_keys(kwargs: dict[str, Any]) -> None:
    """Hydra's own keys (``_args_``, ``_recursive_``, ``_partial_``...) are not settings."""
    for key in kwargs:
        if key.startswith("_") and key.endswith("_"):
            raise _fail(key, "is one of Hydra's instantiate keys, not a strategy setting")


def _local_parts(node: dict[str, Any], entry: Entry | None) -> tuple[str, ...]:
    local = node.get("local")
    parts = tuple(entry.local if entry else ()) if local is None else tuple(local)
    unknown = sorted(set(parts).difference(PARTS))
    if unknown:
        raise _fail("local", f"unknown model parts {unknown}; choose from {list(PARTS)}")
    if set(parts) >= {"backbone", "neck", "head"}:
        raise _fail("local", "keeps the whole model local: nothing would be shared")
    return parts


def _inner(cfg: DictConfig, node: dict[str, Any]) -> tuple[fl.Strategy, Entry | None]:
    kwargs = {k: v for k, v in node.items() if k not in RESERVED}
    name = str(node.get("name"))
    if node.get("_target_"):
        target = _import(str(node["_target_"]), recorded(cfg))
        _hydra_keys(kwargs)
        check_kwargs("", target, kwargs)
        params = inspect.signature(target).parameters
        sampling = {k: v for k, v in _sampling(cfg).items() if k in params}
        from hydra.utils import instantiate

        # the class already checked (not its name again); nested values stay plain data
        spec = {"_target_": target, **sampling, **kwargs, "_recursive_": False, "_convert_": "all"}
        try:
            strategy = instantiate(spec)
        except Exception as e:  # the user's constructor: one line naming the key and the error
            cause = e.__cause__ or e
            raise _fail("_target_", f"{node['_target_']}(...) failed: {cause}") from e
        if not isinstance(strategy, fl.Strategy):
            raise _fail("_target_", f"{node['_target_']!r} did not build a Flower Strategy")
        return strategy, None
    if name not in REGISTRY:
        raise StrategyConfigError(
            f"config: strategy.name={name!r} is unknown; choose one of {sorted(REGISTRY)} "
            "or give your own class as strategy._target_"
        )
    entry = REGISTRY[name]
    if entry.cls is fl.QFedAvg:  # the client's learning rate and our loss metric by default
        kwargs.setdefault("client_learning_rate", float(cfg.train.lr0))
        kwargs.setdefault("train_loss_key", LOSS)
    check_kwargs("", entry.cls, kwargs)
    _check_robust(name, kwargs, sampled_clients(cfg))
    return entry.cls(**_sampling(cfg), **kwargs), entry


def _with_dp(cfg: DictConfig, strategy: fl.Strategy, dp: dict[str, Any]) -> fl.Strategy:
    dp = dict(dp)
    kind = dp.pop("kind", None)
    if kind not in DP_KINDS:
        raise _fail("dp.kind", f"{kind!r} is unknown; choose one of {sorted(DP_KINDS)}")
    cls = DP_KINDS[kind]
    check_kwargs("dp.", cls, dp, skip=("strategy", "num_sampled_clients", "accountant"))
    down = str(cfg.transport.get("down", "fp32"))
    if kind.startswith("client") and (str(cfg.transport.scheme) != "fp32" or down != "fp32"):
        raise _fail(
            "dp.kind",
            f"{kind} clips the clients' plain weights against the model as received: use "
            f"transport=fp32 with transport.down=fp32 (not {cfg.transport.scheme}, down {down})",
        )
    return cls(strategy=strategy, num_sampled_clients=sampled_clients(cfg), **dp)


def describe(cfg: DictConfig) -> dict[str, Any]:
    """What the strategy config means, resolved: local parts, BN statistics policy, DP kind."""
    node = OmegaConf.to_container(cfg.strategy, resolve=True)
    assert isinstance(node, dict)
    entry = None if node.get("_target_") else REGISTRY.get(str(node.get("name")))
    dp = node.get("dp") or None
    bn = str(node.get("bn_stats", "auto"))
    if bn not in ("auto", "average", "pooled", "strategy"):
        raise _fail("bn_stats", f"{bn!r} is invalid; expected auto, average, pooled or strategy")
    if bn == "auto":
        bn = "average" if (entry and entry.server_optimizer) or dp else "strategy"
    return {
        "local": _local_parts(node, entry),
        "bn_stats": bn,
        "dp": dict(dp) if dp else None,
    }


def build_strategy(cfg: DictConfig, run_dir: Any = None, masks: dict | None = None):
    """The run's strategy (``GuardedStrategy`` around the configured one).

    Raises StrategyConfigError.
    """
    from strategies.guarded import AggregationPolicy, GuardedStrategy

    node = OmegaConf.to_container(cfg.strategy, resolve=True)
    assert isinstance(node, dict)
    info = describe(cfg)
    strategy, _ = _inner(cfg, node)
    if info["dp"]:
        strategy = _with_dp(cfg, strategy, info["dp"])
    return GuardedStrategy(
        strategy,
        AggregationPolicy.from_cfg(cfg),
        bn_stats_mask=(masks or {}).get("bn_stats") if info["bn_stats"] != "strategy" else None,
        bn_pooled=(masks["bn_mean"], masks["bn_var"])
        if masks and info["bn_stats"] == "pooled"
        else None,
        run_dir=run_dir,
    )
