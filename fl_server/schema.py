"""The schema of a run's config: one dataclass per group, the types and allowed values of every key.

Why a schema beside ``configs/``: the YAML files hold the defaults and, in their comments, the
user's documentation; this module holds what a value may be. Hydra validates every composed
config against it (``fl_server.config`` registers these classes in its ConfigStore and each YAML
file names its schema in its defaults list), so a value of the wrong type stops at composition and
a value out of range stops in ``__post_init__`` (run by ``OmegaConf.to_object``), each with one
line naming the key. Defaults live once: no field here has a default where the YAML sets one
(``MISSING``), so the two cannot disagree.

Strategy parameters are free-form (each strategy takes its own, ``strategy=custom`` any), so
``strategy`` is ``Any`` with its name checked; each engine's keys have their own class
(``ENGINES``). Plain stdlib: importing this module imports neither Hydra nor torch, so the
docs and the bottom layer can read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional, get_type_hints

from fl_client.errors import UserError

MISSING: Any = "???"  # OmegaConf's marker of a value the YAML must give
CONFIG_VERSION = 5  # written into every new run's config.yaml; fl_server.config.migrate reads it


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the key."""


def rule(expected: str, check: Callable[[Any], bool]) -> Any:
    """A field the YAML gives (no default here), allowed when ``check`` holds (``expected`` says
    what is allowed: the error message and the docs' reference both print it)."""
    return field(default=MISSING, metadata={"expected": expected, "check": check})


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: _int(v) and v >= low


def between(low: float, high: float, low_in: bool = True, high_in: bool = True) -> Any:
    def check(v: Any) -> bool:
        return (
            _num(v) and (v >= low if low_in else v > low) and (v <= high if high_in else v < high)
        )

    return check


def ge(low: float) -> Callable[[Any], bool]:
    return lambda v: _num(v) and v >= low


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: v in choices


BOOL = ("true or false", _bool)
NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}"
OPTIMIZERS = ("Adam", "AdamW", "Adamax", "MuSGD", "NAdam", "RAdam", "RMSProp", "SGD")


class Checked:
    """``__post_init__`` checks every field declared with ``rule`` and raises ``ConfigError``
    naming the first wrong one as ``<group>.<key>``."""

    KEY: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if "check" not in f.metadata or value == MISSING:  # the class itself, not a config
                continue
            if not f.metadata["check"](value):
                raise ConfigError(invalid(f"{self.KEY}{f.name}", value, f.metadata["expected"]))


def invalid(key: str, value: Any, expected: str) -> str:
    return f"config: {key}={value!r} is invalid; expected {expected}"


@dataclass
class ModelConfig(Checked):
    KEY: ClassVar[str] = "model."
    cfg: str = rule("a model yaml or .pt path", lambda v: isinstance(v, str) and v != "")


@dataclass
class SynthConfig(Checked):
    KEY: ClassVar[str] = "data.synth."
    images: int = rule("an integer >= 8", at_least(8))
    imgsz: int = rule("an integer >= 32", at_least(32))
    domains: list[str] = MISSING


@dataclass
class DataConfig(Checked):
    KEY: ClassVar[str] = "data."
    path: Optional[str] = MISSING  # noqa: UP045 (OmegaConf reads Optional, not X | None, on 3.11)
    partition: str = rule(
        "iid, dirichlet, domain or none (the clients bring their own data)",
        one_of("iid", "dirichlet", "domain", "none"),
    )
    alpha: float = rule("a number > 0", lambda v: _num(v) and v > 0)
    server_val_fraction: float = rule("a number in (0, 0.5]", between(0, 0.5, low_in=False))
    client_val_fraction: float = rule("a number in (0, 0.5]", between(0, 0.5, low_in=False))
    cache_dir: str = MISSING
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class FederationConfig(Checked):
    KEY: ClassVar[str] = "federation."
    clients: int = rule("an integer >= 1", at_least(1))
    rounds: int = rule("an integer >= 1", at_least(1))
    fraction: float = rule("a number in (0, 1]", between(0, 1, low_in=False))
    fraction_evaluate: float = rule("a number in [0, 1]", between(0, 1))
    round_timeout: float = rule("a number of seconds > 0", lambda v: _num(v) and v > 0)
    sampling: str = rule("uniform, data or recency", one_of("uniform", "data", "recency"))
    max_skip: int = rule("an integer >= 1", at_least(1))
    overlap_eval: bool = rule(*BOOL)


def _device(v: Any) -> bool:
    return str(v) in {"auto", "cpu"} or all(p.isdigit() for p in str(v).split(","))


@dataclass
class TrainConfig(Checked):
    KEY: ClassVar[str] = "train."
    epochs: int = rule("an integer >= 1", at_least(1))
    imgsz: int = rule(
        "an integer >= 32, a multiple of 32", lambda v: _int(v) and v >= 32 and v % 32 == 0
    )
    batch: int = rule("an integer >= 2", at_least(2))
    lr0: float = rule("a number in (0, 10)", between(0, 10, False, False))
    # fl_server.lr_schedule.SCHEDULES (not imported: the schema is fl_server's floor, which
    # imports nothing above fl_client; tests/fl_server/test_lr_schedule.py checks they agree)
    lr_schedule: str = rule("constant, linear or cos", one_of("constant", "linear", "cos"))
    lrf: float = rule("a number in (0, 1]", between(0, 1, low_in=False))
    optimizer: str = rule(
        f"one of {list(OPTIMIZERS)} ('auto' ignores lr0 and momentum, so it is refused)",
        one_of(*OPTIMIZERS),
    )
    momentum: float = rule("a number in [0, 1)", between(0, 1, high_in=False))
    weight_decay: float = rule("a number in [0, 1)", between(0, 1, high_in=False))
    mosaic: float = rule("a number in [0, 1]", between(0, 1))
    device: Any = rule("auto, cpu or a CUDA device index like 0", _device)  # 0 or "0,1" or "cpu"
    amp: bool = rule(*BOOL)
    workers: int = rule("an integer >= 0", at_least(0))
    eval_batch: int = rule("an integer >= 1", at_least(1))
    keep_momentum: bool = rule(*BOOL)


@dataclass
class TransportConfig(Checked):
    """``scheme`` is checked against ``fl_client.transport.SCHEMES`` by ``fl_server.config``
    (the codecs import torch)."""

    KEY: ClassVar[str] = "transport."
    scheme: str = MISSING
    block: int = rule("an even integer >= 2", lambda v: _int(v) and v >= 2 and v % 2 == 0)
    fraction: float = rule("a number in (0, 1]", between(0, 1, low_in=False))
    error_feedback: bool = rule(*BOOL)
    down: str = rule("fp32 or q4z", lambda v: v in ("fp32", "q4z"))  # the global model's way


@dataclass
class EngineConfig(Checked):
    """Every engine's ``name`` (checked against the installed engines by ``fl_server.config``);
    each engine's own keys are its subclass in ``ENGINES``."""

    KEY: ClassVar[str] = "engine."
    name: str = MISSING


@dataclass
class SimulationEngine(EngineConfig):
    client_cpus: int = rule("an integer >= 1", at_least(1))
    client_gpus: float = rule("a number >= 0", lambda v: _num(v) and v >= 0)


@dataclass
class LocalDeploymentEngine(EngineConfig):
    host: str = MISSING
    port: int = rule("a port in [0, 65535] (0 = a free port)", lambda v: _int(v) and 0 <= v < 65536)
    startup_timeout: float = rule("a number of seconds > 0", lambda v: _num(v) and v > 0)
    client_threads: int = rule("an integer >= 1", at_least(1))
    insecure: bool = rule(*BOOL)
    warm_worker: bool = rule(*BOOL)
    isolation: str = rule("namespace or none", one_of("namespace", "none"))


@dataclass
class ComposeEngine(EngineConfig):
    server_image: str = MISSING
    client_image: str = MISSING
    client_platform: str = rule(
        "auto, linux/amd64 or linux/arm64", one_of("auto", "linux/amd64", "linux/arm64")
    )
    build: str = rule("missing, always or never", one_of("missing", "always", "never"))
    offline: bool = rule(*BOOL)
    base_image: str = MISSING
    port: int = rule("a port in [0, 65535] (0 = a free port)", lambda v: _int(v) and 0 <= v < 65536)
    startup_timeout: float = rule("a number of seconds > 0", lambda v: _num(v) and v > 0)
    client_cpus: float = rule("a number > 0", lambda v: _num(v) and v > 0)
    client_threads: int = rule("an integer >= 1", at_least(1))
    keep: bool = rule(*BOOL)
    warm_worker: bool = rule(*BOOL)
    client_memory: str = rule("a size such as 512m or 6g", lambda v: _size(v))
    client_pids: int = rule("an integer >= 16", at_least(16))
    server_cpus: float = rule("a number > 0", lambda v: _num(v) and v > 0)
    server_memory: str = rule("a size such as 512m or 6g", lambda v: _size(v))
    server_pids: int = rule("an integer >= 16", at_least(16))


def _size(v) -> bool:
    """A Docker memory size: a number with an optional b, k, m or g (6g, 512m)."""
    return re.fullmatch(r"[1-9][0-9]*[bkmg]?", str(v).lower()) is not None


@dataclass
class SuperlinkEngine(EngineConfig):
    address: str = rule("host:port of a running SuperLink", lambda v: ":" in str(v))
    # paths: "" (the defaults) is refused in one line by the engine when it starts
    root_ca: str = rule("the path of the SuperLink's CA certificate", lambda v: isinstance(v, str))
    public_keys: str = rule("a folder of *.pub node public keys", lambda v: isinstance(v, str))
    startup_timeout: float = rule("a number of seconds > 0", lambda v: _num(v) and v > 0)
    app: str = rule("a folder with fedyolo's pyproject.toml, or ''", lambda v: isinstance(v, str))


ENGINES: dict[str, type[EngineConfig]] = {
    "simulation": SimulationEngine,
    "local-deployment": LocalDeploymentEngine,
    "compose": ComposeEngine,
    "superlink": SuperlinkEngine,
}


@dataclass
class AggregationConfig(Checked):
    KEY: ClassVar[str] = "aggregation."
    min_replies: int = rule("an integer >= 1", at_least(1))
    max_examples: Optional[int] = rule("null or an integer >= 1", optional(at_least(1)))  # noqa: UP045
    clip_x_median: Optional[float] = rule("null or a number >= 1", optional(ge(1)))  # noqa: UP045
    max_update_ratio: Optional[float] = rule(  # noqa: UP045
        "null or a number > 0", optional(lambda v: _num(v) and v > 0)
    )
    max_step_norm_x_median: Optional[float] = rule(  # noqa: UP045
        "null or a number >= 1", optional(ge(1))
    )
    max_norm_x_median: Optional[float] = rule("null or a number >= 1", optional(ge(1)))  # noqa: UP045


@dataclass
class GuardConfig(Checked):
    KEY: ClassVar[str] = "guard."
    enabled: bool = rule(*BOOL)
    metric: str = rule("map50_95 or map50", one_of("map50_95", "map50"))
    reference: str = rule("best or previous", one_of("best", "previous"))
    max_drop: float = rule("a number in (0, 1)", between(0, 1, False, False))
    min_abs_drop: float = rule("a number in [0, 1)", between(0, 1, high_in=False))
    significance: Optional[float] = rule(  # noqa: UP045
        "null or a number in (0, 0.5)", optional(between(0, 0.5, False, False))
    )
    bootstrap: int = rule("an integer >= 20", at_least(20))
    patience: int = rule("an integer >= 0", at_least(0))
    severe_drop: Optional[float] = rule(  # noqa: UP045
        "null or a number in (0, 1]", optional(between(0, 1, low_in=False))
    )
    contribution: bool = rule(*BOOL)
    contribution_sample: int = rule("an integer >= 0 (0 = score every client)", at_least(0))
    min_flag_gain: float = rule("a number in [0, 1)", between(0, 1, high_in=False))
    flag_agreement: Optional[float] = rule("null or a number in [-1, 1]", optional(between(-1, 1)))  # noqa: UP045
    policy: str = rule("rollback, lower_lr or exclude", one_of("rollback", "lower_lr", "exclude"))
    lr_factor: float = rule("a number in (0, 1)", between(0, 1, False, False))
    exclude_rounds: int = rule("an integer >= 1", at_least(1))
    stop_after: Optional[int] = rule("null or an integer >= 1", optional(at_least(1)))  # noqa: UP045


@dataclass
class FaultsConfig(Checked):
    """Checked as a whole by ``fl_client.faults.parse`` (it knows the clients and the kinds)."""

    KEY: ClassVar[str] = "faults."
    client: Any = MISSING  # a partition id or a list of them
    round: Any = MISSING  # a round or a list of rounds
    kind: Optional[str] = MISSING  # noqa: UP045
    scale: float = MISSING
    hang_seconds: Optional[float] = MISSING  # noqa: UP045
    more: list[Any] = MISSING


@dataclass
class TrackingConfig(Checked):
    KEY: ClassVar[str] = "tracking."
    enabled: bool = rule(*BOOL)
    mode: str = rule("auto, online or offline", one_of("auto", "online", "offline"))
    project: str = rule("a ClearML project name", lambda v: isinstance(v, str) and v != "")
    task_name: Optional[str] = MISSING  # noqa: UP045
    connect_timeout: float = rule("seconds in (0, 600]", between(0, 600, low_in=False))


@dataclass
class DistillConfig(Checked):
    KEY: ClassVar[str] = "distill."
    teacher: Optional[str] = rule(  # noqa: UP045
        "null or a .pt checkpoint (e.g. runs/<run>/best.pt)",
        optional(lambda v: isinstance(v, str) and v.endswith(".pt")),
    )
    weight: float = rule("a number > 0", lambda v: _num(v) and v > 0)


@dataclass
class DriftConfig(Checked):
    KEY: ClassVar[str] = "drift."
    enabled: bool = rule(*BOOL)
    sample: int = rule("an integer >= 1", at_least(1))
    reference_rounds: int = rule("an integer >= 1", at_least(1))
    threshold: float = rule("a number in (0, 1]", between(0, 1, low_in=False))


@dataclass
class OutputConfig(Checked):
    KEY: ClassVar[str] = "output."
    dir: str = MISSING
    overwrite: bool = rule(*BOOL)
    save_matches: bool = rule(*BOOL)


def _strategy(v: Any) -> bool:
    name = v.get("name") if hasattr(v, "get") else None
    return isinstance(name, str) and name != ""


def _hooks(v: Any) -> bool:
    return v is None or (isinstance(v, list) and all(isinstance(h, str) and ":" in h for h in v))


@dataclass
class FedyoloConfig(Checked):
    """The whole run (``configs/config.yaml``). ``trusted_plugins`` is never read from a file:
    ``fl_server.config`` writes this process's ``--trust-plugin`` grant there."""

    config_version: int = rule(
        f"an integer in [0, {CONFIG_VERSION}]", lambda v: _int(v) and 0 <= v <= CONFIG_VERSION
    )
    seed: int = rule("an integer", _int)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: Any = MISSING  # free-form: each strategy's own parameters (strategies.registry)
    transport: TransportConfig = field(default_factory=TransportConfig)
    engine: Any = MISSING  # an EngineConfig subclass by engine.name (ENGINES)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    hooks: Optional[list[str]] = rule(  # noqa: UP045
        "a list of round hooks by import path, module:attribute", _hooks
    )
    # a run name becomes a folder name and travels to Flower's run config: a safe alphabet only
    name: Optional[str] = rule(  # noqa: UP045
        "null or 1-100 of letters, digits, '.', '_', '-' (not starting with '.' or '-')",
        optional(lambda v: isinstance(v, str) and re.fullmatch(NAME, v) is not None),
    )
    resume: Optional[str] = MISSING  # noqa: UP045
    output: OutputConfig = field(default_factory=OutputConfig)
    log_level: str = MISSING
    trusted_plugins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy != MISSING and not _strategy(self.strategy):
            raise ConfigError(
                invalid("strategy.name", self.strategy.get("name"), "a strategy name")
            )


def all_keys(cls: type = FedyoloConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every key of the schema as (dotted key, type, what is allowed), in order: the docs'
    reference table (``docs/hooks.py``)."""
    out: list[tuple[str, Any, str]] = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, Checked):
            out += all_keys(kind, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, kind, f.metadata.get("expected", "")))
    return out
