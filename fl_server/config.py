"""Compose and validate the Hydra config of a run.

Defaults live once, in ``configs/``; this module only composes them with the user's overrides
and checks the values, so a bad value stops the run with one line naming the key before any
work starts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fl_client.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the key."""


# What a resumed run may change: how long it goes on and where it runs, not what it trains.
RESUME_OVERRIDABLE = (
    "federation.rounds",
    "federation.round_timeout",
    "engine",  # the group (engine=local-deployment) or its keys (engine.port=...)
    "log_level",
)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/config.yaml`` with Hydra command-line style overrides.

    With ``resume=runs/<name>`` the run's own ``config.yaml`` is the base instead, and only
    ``RESUME_OVERRIDABLE`` keys may change.

    The plug-ins this process trusts (``fl_server.plugins.granted``, from ``--trust-plugin``)
    are recorded as ``trusted_plugins``, replacing whatever a file said; no override sets them.
    """
    from fl_server import plugins

    plugins.refuse_overrides(overrides)
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if resume not in (None, "", "null"):
        rest = [o for o in overrides if not o.startswith("resume=")]
        scheme, remote, _ = str(resume).partition("://")
        if remote and scheme in plugins.registered(plugins.RUN_SOURCE):
            return _compose_resume(_fetch(str(resume)), rest)
        return _compose_resume(Path(resume), rest)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"config: {_one_line(str(e))}") from e
    _record_trust(cfg)
    validate(cfg)
    return cfg


def _record_trust(cfg: DictConfig) -> None:
    """``trusted_plugins``: this process's grant, whatever the config said before (a run
    directory's config.yaml, a file): see ``fl_server.plugins`` for why only the command line."""
    from omegaconf import open_dict

    from fl_server import plugins

    with open_dict(cfg):
        cfg[plugins.KEY] = list(plugins.granted())


def _fetch(url: str) -> Path:
    """``resume=<scheme>://.../<run>``: the run's copy, fetched by the run source registered for
    its scheme (entry points ``fedyolo.run_sources``: ``s3`` is ``deploy.aws.s3state``, the
    server's copy, signed and checked) into ``runs/<run>`` of the current directory; then
    resumed from there. fl_server imports no source: the package that owns one registers it."""
    from fl_server import plugins

    path = plugins.registered(plugins.RUN_SOURCE)[url.partition("://")[0]]
    fetch = plugins.load(path, plugins.RUN_SOURCE, (), f"config: resume={url}")
    name = url.rstrip("/").rsplit("/", 1)[-1]
    dest = Path("runs") / name
    try:
        fetch(url.rstrip("/"), dest)
    except UserError as e:
        raise ConfigError(f"config: resume={url}: {e}") from e
    return dest


def _compose_resume(path: Path, overrides: list[str]) -> DictConfig:
    import yaml

    path = path.expanduser().resolve()
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"config: resume={path} is not a run directory (no config.yaml)")
    from fl_server import state

    try:  # the whole state is read and checked before anything starts or is written
        state.check(path / state.FILENAME)
    except FileNotFoundError as e:
        raise ConfigError(
            f"config: resume={path} has no {state.FILENAME}: the run never finished its set-up; "
            "start it again instead"
        ) from e
    except state.StateError as e:
        raise ConfigError(f"config: resume={path}: {e}") from e
    cfg = _with_new_keys(load(path / "config.yaml"))
    for o in overrides:
        key, sep, value = o.partition("=")
        if key == "engine" and sep:  # the group: continue on another engine
            _switch_engine(cfg, value)
            continue
        if not sep or not any(key == k or key.startswith(k + ".") for k in RESUME_OVERRIDABLE):
            raise ConfigError(
                f"config: {o!r} cannot change when resuming; allowed: {list(RESUME_OVERRIDABLE)}"
            )
        OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=False)
    cfg.resume = str(path)
    _record_trust(cfg)
    validate(cfg)
    return cfg


def _switch_engine(cfg: DictConfig, name: str) -> None:
    group = CONFIG_DIR / "engine" / f"{name}.yaml"
    if not group.is_file():
        raise ConfigError(f"config: engine={name!r} is not one of configs/engine/")
    cfg.engine = OmegaConf.load(group)


def _with_new_keys(cfg: DictConfig) -> DictConfig:
    """A run directory's config written before a setting existed gets its default."""
    if "hooks" not in cfg:
        cfg.hooks = []
    if "distill" not in cfg:
        cfg.distill = {"teacher": None, "weight": 6.0}
    # checks added later stay off for a run that started without them (it resumes as it ran)
    if "max_step_norm_x_median" not in cfg.aggregation:
        cfg.aggregation.max_step_norm_x_median = None
    if "significance" not in cfg.guard:
        cfg.guard.significance = None
    if "bootstrap" not in cfg.guard:
        cfg.guard.bootstrap = 200
    if "save_matches" not in cfg.output:
        cfg.output.save_matches = False
    if "contribution" not in cfg.guard:
        cfg.guard.contribution = False
    if "min_flag_gain" not in cfg.guard:
        cfg.guard.min_flag_gain = 0.01
    if "flag_agreement" not in cfg.guard:
        cfg.guard.flag_agreement = None
    if "patience" not in cfg.guard:
        cfg.guard.patience = 0
    if "severe_drop" not in cfg.guard:
        cfg.guard.severe_drop = 0.5
    return cfg


def from_run(path: Path, overrides: Sequence[str]) -> DictConfig:
    """A new run's config: run ``path``'s own config.yaml with ``key=value`` overrides (any key
    that exists; ``engine=<name>`` switches the engine group). Same data, partition and seed as
    that run unless overridden: what ``fedyolo distill`` starts from."""
    import yaml

    from fl_server import plugins

    plugins.refuse_overrides(overrides)
    path = Path(path).expanduser().resolve()
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"config: {path} is not a run directory (no config.yaml)")
    cfg = _with_new_keys(load(path / "config.yaml"))
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep:
            raise ConfigError(f"config: {o!r} is not key=value")
        if key == "engine":
            _switch_engine(cfg, value)
            continue
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"config: {key!r} is not a setting of {path / 'config.yaml'}")
        OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=False)
    _record_trust(cfg)
    validate(cfg)
    return cfg


def _one_line(message: str) -> str:
    """Hydra's multi-line error as one line: the problem plus the fix, or the choices."""
    lines = [x.strip() for x in message.strip().splitlines() if x.strip()]
    first = lines[0]
    for group in ("strategy", "transport"):
        if f"Could not find '{group}/" in first:
            choices = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
            return f"{first}; choose one of {choices}"
    hint = next((x for x in lines[1:] if x.startswith("To append")), "")
    return f"{first} {hint}".strip()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool)


def _schemes() -> tuple[str, ...]:
    from fl_client.transport import SCHEMES  # imported lazily: it pulls in torch

    return SCHEMES


def _engines() -> list[str]:
    from fl_server import engines

    return engines.names()


_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}"


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _rule(check: Callable[[Any], bool], expected: str) -> tuple[Callable[[Any], bool], str]:
    return check, expected


_OPTIMIZERS = {"SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSProp", "MuSGD"}
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _rule(_is_int, "an integer"),
    "federation.clients": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "federation.rounds": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "federation.fraction": _rule(lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "federation.fraction_evaluate": _rule(
        lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"
    ),
    "federation.round_timeout": _rule(lambda v: _is_num(v) and v > 0, "a number of seconds > 0"),
    "train.epochs": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.imgsz": _rule(
        lambda v: _is_int(v) and v >= 32 and v % 32 == 0, "an integer >= 32, a multiple of 32"
    ),
    "train.batch": _rule(lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "train.eval_batch": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train.lr0": _rule(lambda v: _is_num(v) and 0 < v < 10, "a number in (0, 10)"),
    "train.momentum": _rule(lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "train.weight_decay": _rule(lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "train.mosaic": _rule(lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "train.optimizer": _rule(
        lambda v: v in _OPTIMIZERS,
        f"one of {sorted(_OPTIMIZERS)} ('auto' ignores lr0 and momentum, so it is refused)",
    ),
    "train.device": _rule(
        lambda v: str(v) in {"auto", "cpu"} or all(p.isdigit() for p in str(v).split(",")),
        "auto, cpu or a CUDA device index like 0",
    ),
    "train.amp": _rule(lambda v: isinstance(v, bool), "true or false"),
    "train.workers": _rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "model.cfg": _rule(lambda v: isinstance(v, str) and v != "", "a model yaml or .pt path"),
    "data.partition": _rule(
        lambda v: v in {"iid", "dirichlet", "domain"}, "iid, dirichlet or domain"
    ),
    "data.alpha": _rule(lambda v: _is_num(v) and v > 0, "a number > 0"),
    "data.server_val_fraction": _rule(
        lambda v: _is_num(v) and 0 < v <= 0.5, "a number in (0, 0.5]"
    ),
    "data.client_val_fraction": _rule(
        lambda v: _is_num(v) and 0 < v <= 0.5, "a number in (0, 0.5]"
    ),
    "data.synth.images": _rule(lambda v: _is_int(v) and v >= 8, "an integer >= 8"),
    "data.synth.imgsz": _rule(lambda v: _is_int(v) and v >= 32, "an integer >= 32"),
    "engine.name": _rule(lambda v: v in _engines(), "an engine of fl_server.engines"),
    # a run name becomes a folder name and travels to Flower's run config: a safe alphabet only
    "name": _rule(
        lambda v: v is None or (isinstance(v, str) and re.fullmatch(_NAME, v) is not None),
        "null or 1-100 of letters, digits, '.', '_', '-' (not starting with '.' or '-')",
    ),
    "hooks": _rule(
        lambda v: (
            v is None or (OmegaConf.is_list(v) and all(isinstance(h, str) and ":" in h for h in v))
        ),
        "a list of round hooks by import path, module:attribute",
    ),
    "aggregation.min_replies": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "aggregation.max_examples": _rule(
        lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"
    ),
    "aggregation.clip_x_median": _rule(
        lambda v: v is None or (_is_num(v) and v >= 1), "null or a number >= 1"
    ),
    "aggregation.max_update_ratio": _rule(
        lambda v: v is None or (_is_num(v) and v > 0), "null or a number > 0"
    ),
    "aggregation.max_norm_x_median": _rule(
        lambda v: v is None or (_is_num(v) and v >= 1), "null or a number >= 1"
    ),
    "aggregation.max_step_norm_x_median": _rule(
        lambda v: v is None or (_is_num(v) and v >= 1), "null or a number >= 1"
    ),
    "transport.scheme": _rule(lambda v: v in _schemes(), "a scheme of fl_client.transport"),
    "transport.block": _rule(
        lambda v: _is_int(v) and v >= 2 and v % 2 == 0, "an even integer >= 2"
    ),
    "transport.fraction": _rule(lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "transport.error_feedback": _rule(lambda v: isinstance(v, bool), "true or false"),
    "strategy.name": _rule(lambda v: isinstance(v, str) and v != "", "a strategy name"),
    "guard.enabled": _rule(lambda v: isinstance(v, bool), "true or false"),
    "guard.metric": _rule(lambda v: v in {"map50_95", "map50"}, "map50_95 or map50"),
    "guard.reference": _rule(lambda v: v in {"best", "previous"}, "best or previous"),
    "guard.max_drop": _rule(lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "guard.min_abs_drop": _rule(lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "guard.significance": _rule(
        lambda v: v is None or (_is_num(v) and 0 < v < 0.5), "null or a number in (0, 0.5)"
    ),
    "guard.flag_agreement": _rule(
        lambda v: v is None or (_is_num(v) and -1 <= v <= 1), "null or a number in [-1, 1]"
    ),
    "guard.patience": _rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "guard.severe_drop": _rule(
        lambda v: v is None or (_is_num(v) and 0 < v <= 1), "null or a number in (0, 1]"
    ),
    "guard.bootstrap": _rule(lambda v: _is_int(v) and v >= 20, "an integer >= 20"),
    "guard.min_flag_gain": _rule(lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "guard.contribution": _rule(lambda v: isinstance(v, bool), "true or false"),
    "guard.policy": _rule(
        lambda v: v in {"rollback", "lower_lr", "exclude"}, "rollback, lower_lr or exclude"
    ),
    "guard.lr_factor": _rule(lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "guard.exclude_rounds": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "guard.stop_after": _rule(
        lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"
    ),
    "tracking.enabled": _rule(lambda v: isinstance(v, bool), "true or false"),
    "tracking.mode": _rule(lambda v: v in {"auto", "online", "offline"}, "auto, online or offline"),
    "tracking.project": _rule(lambda v: isinstance(v, str) and v != "", "a ClearML project name"),
    "tracking.connect_timeout": _rule(lambda v: _is_num(v) and 0 < v <= 600, "seconds in (0, 600]"),
    "distill.teacher": _rule(
        lambda v: v is None or (isinstance(v, str) and v.endswith(".pt")),
        "null or a .pt checkpoint (e.g. runs/<run>/best.pt)",
    ),
    "distill.weight": _rule(lambda v: _is_num(v) and v > 0, "a number > 0"),
    "drift.enabled": _rule(lambda v: isinstance(v, bool), "true or false"),
    "drift.sample": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "drift.reference_rounds": _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "drift.threshold": _rule(lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
}


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming the first key whose value is wrong."""
    for key, (check, expected) in _RULES.items():
        value = OmegaConf.select(cfg, key, default="__missing__")
        if value == "__missing__":
            raise ConfigError(f"config: '{key}' is missing")
        if not check(value):
            raise ConfigError(f"config: {key}={value!r} is invalid; expected {expected}")
    engine = cfg.engine
    if engine.get("insecure") and not _loopback(str(engine.get("host", ""))):
        raise ConfigError(
            f"config: engine.insecure=true with engine.host={engine.get('host')}: plaintext "
            "(no TLS, no SuperNode authentication) is allowed on a loopback address only"
        )
    from fl_server import plugins
    from fl_server.hooks import hook_classes

    hook_classes([str(h) for h in cfg.hooks or []], plugins.recorded(cfg))  # imports if trusted
    teacher = cfg.distill.teacher
    if teacher is not None and not Path(str(teacher)).expanduser().is_file():
        raise ConfigError(f"config: distill.teacher={cfg.distill.teacher!r} does not exist")
    if cfg.data.path is not None and not Path(str(cfg.data.path)).expanduser().exists():
        raise ConfigError(f"config: data.path={cfg.data.path!r} does not exist")
    from fl_client.model import ModelConfigError, resolve_model_cfg

    try:
        resolve_model_cfg(str(cfg.model.cfg))
    except ModelConfigError as e:
        raise ConfigError(f"config: {e}") from e
    _validate_strategy(cfg)
    from fl_client import faults

    try:
        faults.parse(cfg.faults, int(cfg.federation.clients))
    except ValueError as e:
        raise ConfigError(f"config: {e}") from e


def _validate_strategy(cfg: DictConfig) -> None:
    """Build the strategy once, so unknown names and bad parameters stop the run here."""
    from omegaconf.errors import OmegaConfBaseException

    from strategies import StrategyConfigError, build_strategy
    from strategies.registry import sampled_clients

    if int(cfg.aggregation.min_replies) > sampled_clients(cfg):
        raise ConfigError(
            f"config: aggregation.min_replies={cfg.aggregation.min_replies} is more than the "
            f"{sampled_clients(cfg)} clients sampled per round: no round could succeed"
        )
    from flwr.common.logger import FLOWER_LOGGER

    level = FLOWER_LOGGER.level  # a throwaway build: its notes (e.g. "fraction_evaluate is 0")
    FLOWER_LOGGER.setLevel(logging.ERROR)  # come from the ServerApp's real one, not before an error
    try:
        build_strategy(cfg)
    except StrategyConfigError as e:
        raise ConfigError(str(e)) from e
    except OmegaConfBaseException as e:  # e.g. strategy=custom without strategy._target_
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"config: strategy: {first}") from e
    finally:
        FLOWER_LOGGER.setLevel(level)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def load(path: Path) -> DictConfig:
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return cfg
