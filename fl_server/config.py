"""Compose, migrate and validate the config of a run: one composer, one override grammar.

Defaults live once, in ``configs/`` (the YAML files, whose comments are the user's docs); what a
value may be lives once, in ``fl_server.schema`` (registered in Hydra's ConfigStore as the schema
``configs/config.yaml`` starts from). A fresh run, a resumed run and a distilled run all read
``key=value`` with Hydra's override grammar (``apply_overrides``), and a bad value stops the run
with one line naming the key before any work starts. A run directory's ``config.yaml`` from an
older fedyolo is brought up to date by ``migrate`` (its ``config_version``), as it ran.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from fl_client.errors import UserError
from fl_client.lazy import lazy
from fl_server import engines, plugins
from fl_server.hooks import hook_classes
from fl_server.run_dir import CorruptRecord, RunDir
from fl_server.schema import (
    CONFIG_VERSION,
    ENGINES,
    ConfigError,
    EngineConfig,
    FedyoloConfig,
    all_keys,
    invalid,
)

hydra = lazy("hydra")  # not for --help: only when a config is composed
config_store = lazy("hydra.core.config_store")
overrides_parser = lazy("hydra.core.override_parser.overrides_parser")
hydra_errors = lazy("hydra.errors")

__all__ = [
    "CONFIG_DIR",
    "RESUME_OVERRIDABLE",
    "ConfigError",
    "compose",
    "compose_settings",
    "from_run",
    "migrate",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SCHEMA = "fedyolo_schema"  # the ConfigStore name configs/config.yaml's defaults list starts with
GROUPS = ("model", "data", "federation", "train", "strategy", "transport", "engine")

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
    plugins.refuse_overrides(overrides)
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if resume not in (None, "", "null"):
        rest = [o for o in overrides if not o.startswith("resume=")]
        scheme, remote, _ = str(resume).partition("://")
        if remote and scheme in plugins.registered(plugins.RUN_SOURCE):
            return _compose_resume(_fetch(str(resume)), rest)
        return _compose_resume(Path(resume), rest)
    cfg = _hydra(overrides)
    _record_trust(cfg)
    validate(cfg)
    return cfg


def compose_settings(
    name: str, overrides: Sequence[str], where: str, error: type[Exception] = ConfigError
) -> DictConfig:
    """A command's settings, ``configs/<name>.yaml`` (``edge/export``, ``deploy/aws``), composed
    by the same composer and override grammar as a run's config; the command checks the values.
    An unknown key or a malformed override is ``error`` with one line naming it."""
    for o in overrides:
        if "=" not in o:
            raise error(f"{where}: {o!r} is not key=value")
        if o.startswith(("+", "~")):  # a command's settings are its file's keys, no others
            raise error(f"{where}: {o!r}: only key=value of configs/{name}.yaml")
    try:
        cfg = _hydra(overrides, name)
    except ConfigError as e:
        unknown = re.search(r"Could not override '([^']+)'", str(e))
        if unknown:
            key = unknown.group(1)
            raise error(f"{where}: unknown setting {key!r} (see configs/{name}.yaml)") from e
        raise error(f"{where}: {str(e).removeprefix('config: ')}") from e
    OmegaConf.set_struct(cfg, False)  # a command's own values may be normalised in place
    return cfg


@cache
def _register_schema() -> None:
    config_store.ConfigStore.instance().store(name=SCHEMA, node=FedyoloConfig)


def _hydra(overrides: Sequence[str], name: str = "config") -> DictConfig:
    """``configs/<name>.yaml`` composed by Hydra (the run's against the schema), errors as one
    line. ``edge/export`` is composed in ``configs/edge``: its keys at the top, as in the file."""
    _register_schema()
    folder, _, stem = name.rpartition("/")
    try:
        with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR / folder), version_base="1.3"):
            return hydra.compose(config_name=stem, overrides=list(overrides))
    except (hydra_errors.HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_message(e)) from e


def _message(e: BaseException, prefix: str = "", schema: type = FedyoloConfig) -> str:
    """The one line for a composition error: a value the schema's type refuses is told as a
    range is (``<key>=<value> is invalid; expected ...``); otherwise Hydra's first line."""
    cause: BaseException | None = e
    while cause is not None:
        key = getattr(cause, "full_key", None)
        key = f"{prefix}{key}" if key else key
        if isinstance(cause, MissingMandatoryValue) and key:
            return f"config: '{key}' is missing"
        typed = isinstance(cause, OmegaConfBaseException) and hasattr(cause, "value")
        if typed and key and "not in" not in str(cause):  # a value its type refuses
            return invalid(key, cause.value, _expected(schema, prefix).get(key, "another type"))
        cause = cause.__cause__
    return f"config: {_one_line(str(e))}"


@cache
def _expected(schema: type, prefix: str) -> dict[str, str]:
    """Each key's allowed values as the schema words them; else its type's name."""
    return {
        prefix + key: expected or f"a value of type {getattr(kind, '__name__', kind)}"
        for key, kind, expected in all_keys(schema)
    }


def _record_trust(cfg: DictConfig) -> None:
    """``trusted_plugins``: this process's grant, whatever the config said before (a run
    directory's config.yaml, a file): see ``fl_server.plugins`` for why only the command line."""
    with open_dict(cfg):
        cfg[plugins.KEY] = list(plugins.granted())


def _fetch(url: str) -> Path:
    """``resume=<scheme>://.../<run>``: the run's copy, fetched by the run source registered for
    its scheme (entry points ``fedyolo.run_sources``: ``s3`` is ``deploy.aws.s3state``, the
    server's copy, signed and checked) into ``runs/<run>`` of the current directory; then
    resumed from there. fl_server imports no source: the package that owns one registers it."""
    path = plugins.registered(plugins.RUN_SOURCE)[url.partition("://")[0]]
    fetch = plugins.load(path, plugins.RUN_SOURCE, (), f"config: resume={url}")
    name = url.rstrip("/").rsplit("/", 1)[-1]
    dest = Path("runs") / name
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with RunDir(dest).held():  # not into a run under way here
            fetch(url.rstrip("/"), dest)
    except UserError as e:
        raise ConfigError(f"config: resume={url}: {e}") from e
    return dest


def _compose_resume(path: Path, overrides: list[str]) -> DictConfig:
    path = path.expanduser().resolve()
    run = RunDir(path)
    if not run.config.is_file():
        raise ConfigError(f"config: resume={path} is not a run directory (no {run.CONFIG})")
    from fl_server import state

    try:  # the whole state is read and checked before anything starts or is written
        state.check(run.state)
    except FileNotFoundError as e:
        raise ConfigError(
            f"config: resume={path} has no {state.FILENAME}: the run never finished its set-up; "
            "start it again instead"
        ) from e
    except state.StateError as e:
        raise ConfigError(f"config: resume={path}: {e}") from e
    try:  # a damaged line (a torn last line is not one: the resume removes it)
        run.rounds(), run.read_events()
    except CorruptRecord as e:
        raise ConfigError(f"config: resume={path}: {e}") from e
    cfg = migrate(load(run.config))
    apply_overrides(cfg, overrides, run.config, allowed=RESUME_OVERRIDABLE)
    cfg.resume = str(path)
    _record_trust(cfg)
    validate(cfg)
    return cfg


def from_run(path: Path, overrides: Sequence[str]) -> DictConfig:
    """A new run's config: run ``path``'s own config.yaml with ``key=value`` overrides (any key
    that exists; ``engine=<name>`` switches the engine group). Same data, partition and seed as
    that run unless overridden: what ``fedyolo distill`` starts from."""
    plugins.refuse_overrides(overrides)
    run = RunDir(Path(path).expanduser().resolve())
    if not run.config.is_file():
        raise ConfigError(f"config: {run.path} is not a run directory (no {run.CONFIG})")
    cfg = migrate(load(run.config))
    apply_overrides(cfg, overrides, run.config)
    _record_trust(cfg)
    validate(cfg)
    return cfg


def apply_overrides(
    cfg: DictConfig, overrides: Sequence[str], base: Path, allowed: Sequence[str] | None = None
) -> None:
    """Apply ``overrides`` to a run's config (``base``) with Hydra's override grammar, as a fresh
    compose reads them: ``key=value`` sets a key that exists, ``+key=value`` adds one,
    ``group=option`` (``engine=local-deployment``) takes that option's composed keys.
    ``allowed``: the only keys that may change (a resumed run's ``RESUME_OVERRIDABLE``)."""
    try:
        parsed = overrides_parser.OverridesParser.create().parse_overrides(list(overrides))
    except hydra_errors.HydraException as e:
        raise ConfigError(f"config: {_one_line(str(e))}") from e
    for o in parsed:
        key, line = o.key_or_group, o.input_line
        if allowed is not None and (
            o.is_delete() or not any(key == k or key.startswith(k + ".") for k in allowed)
        ):
            raise ConfigError(
                f"config: {line!r} cannot change when resuming; allowed: {list(allowed)}"
            )
        if o.is_sweep_override() or o.is_delete() or o.package is not None:
            raise ConfigError(f"config: {line!r}: only key=value, +key=value or group=option")
        if key in GROUPS and not (o.is_add() or o.is_force_add()):
            _switch_group(cfg, key, str(o.value()))
            continue
        exists = OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT
        if exists and o.is_add() and not isinstance(o.value(), dict | list):
            raise ConfigError(
                f"config: Could not append to config. An item is already at '{key}'. "
                f"Either remove + prefix: '{line[1:]}'"
            )
        if not exists and not (o.is_add() or o.is_force_add()):
            raise ConfigError(f"config: {key!r} is not a setting of {base}")
        try:
            OmegaConf.update(cfg, key, o.value(), merge=True, force_add=not exists)
        except OmegaConfBaseException as e:
            raise ConfigError(_message(e)) from e


_ABSENT = object()


def _switch_group(cfg: DictConfig, group: str, option: str) -> None:
    """``group=option`` on a run's config: that option's keys, composed as a fresh run's."""
    if not (CONFIG_DIR / group / f"{option}.yaml").is_file():
        raise ConfigError(f"config: {group}={option!r} is not one of configs/{group}/")
    cfg[group] = _hydra([f"{group}={option}"])[group]


def migrate(cfg: DictConfig) -> DictConfig:
    """A run directory's config written by an older fedyolo, brought to ``CONFIG_VERSION``: each
    step adds the settings that version introduced, with the values that keep the run as it ran
    (checks added later stay off for a run that started without them)."""
    version = int(cfg.get("config_version", 0))
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"config: config_version={version} is newer than this fedyolo's {CONFIG_VERSION}; "
            "upgrade fedyolo to read this run"
        )
    for step in _MIGRATIONS[version:]:
        step(cfg)
    cfg.config_version = CONFIG_VERSION
    return cfg


def _adds(doc: str, news: dict[str, Any]) -> Callable[[DictConfig], None]:
    """A migration step that adds each of ``news`` (dotted key: value) a config lacks."""

    def step(cfg: DictConfig) -> None:
        for key, value in news.items():
            if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
                OmegaConf.update(cfg, key, value, force_add=True)

    step.__doc__ = doc
    return step


_to_1 = _adds(
    "Version 0 (no ``config_version``): what runs before the schema could lack.",
    {
        "hooks": [],
        "distill": {"teacher": None, "weight": 6.0},
        "aggregation.max_step_norm_x_median": None,
        "guard.significance": None,
        "guard.bootstrap": 200,
        "output.save_matches": False,
        "guard.contribution": False,
        "guard.min_flag_gain": 0.01,
        "guard.flag_agreement": None,
        "guard.patience": 0,
        "guard.severe_drop": 0.5,
    },
)
_to_2 = _adds(
    "Version 1: before ``guard.contribution_sample``, every client was scored (0).",
    {"guard.contribution_sample": 0},
)
_to_3 = _adds(
    "Version 2: before ``transport.down`` the global model went down whole (fp32), and clients "
    "were sampled by Flower alone (``federation.sampling``), and the server evaluated a round's "
    "model before the next round's training began (``federation.overlap_eval``).",
    {
        "transport.down": "fp32",
        "federation.sampling": "uniform",
        "federation.max_skip": 10,
        "federation.overlap_eval": False,
    },
)
_to_4 = _adds(
    "Version 3: before ``train.lr_schedule`` the clients trained at a constant ``lr0``.",
    {"train.lr_schedule": "constant", "train.lrf": 0.01},
)

_to_5 = _adds(
    "Version 4: before ``train.keep_momentum`` every round's optimiser started from zero.",
    {"train.keep_momentum": False},
)


# _MIGRATIONS[v]: version v to v + 1
_MIGRATIONS: list[Callable[[DictConfig], None]] = [_to_1, _to_2, _to_3, _to_4, _to_5]


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


def _schemes() -> tuple[str, ...]:
    from fl_client.transport import SCHEMES  # imported lazily: it pulls in torch

    return SCHEMES


def _engines() -> list[str]:
    return engines.names()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_schema(cfg: DictConfig) -> None:
    """The schema's types and ranges (``fl_server.schema``), the engine's by its name; the names
    the schema cannot know (installed engines, transport codecs) against their registries."""
    try:
        plain = OmegaConf.create(OmegaConf.to_container(cfg))  # a key the schema lacks: refused
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FedyoloConfig), plain))
        if cfg.engine.name not in _engines():
            raise ConfigError(
                invalid("engine.name", cfg.engine.name, "an engine of fl_server.engines")
            )
    except OmegaConfBaseException as e:
        raise ConfigError(_message(e)) from e
    schema = ENGINES.get(str(cfg.engine.name))
    try:
        if schema is not None:
            OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg.engine))
        else:  # an installed engine's own keys: its package checks them
            EngineConfig(name=cfg.engine.name)
    except OmegaConfBaseException as e:
        raise ConfigError(_message(e, "engine.", schema or EngineConfig)) from e
    if cfg.transport.scheme not in _schemes():
        raise ConfigError(
            invalid("transport.scheme", cfg.transport.scheme, "a scheme of fl_client.transport")
        )


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming the first key whose value is wrong."""
    check_schema(cfg)
    engine = cfg.engine
    if engine.get("insecure") and not _loopback(str(engine.get("host", ""))):
        raise ConfigError(
            f"config: engine.insecure=true with engine.host={engine.get('host')}: plaintext "
            "(no TLS, no SuperNode authentication) is allowed on a loopback address only"
        )

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
