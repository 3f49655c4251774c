"""A search space: config paths mapped to distributions, with conditional keys.

A space is a yaml (``configs/tuning/spaces/default.yaml``) read into :class:`Param`s in file
order; a key with ``when`` is suggested only when the keys it names took one of the given
values (``strategy.proximal_mu`` only for FedProx). A key that names a config group
(``strategy``) chooses the group, and becomes a Hydra group override (``strategy=fedprox``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fl_client.errors import UserError
from fl_server.config import CONFIG_DIR

GROUPS = frozenset(  # the run's config groups (edge, deploy: the settings of other commands)
    p.name
    for p in CONFIG_DIR.iterdir()
    if p.is_dir() and p.name not in ("tuning", "edge", "deploy")
)
KINDS = ("float", "int", "categorical")


class TuningError(UserError, ValueError):
    """A tuning setting or search space is wrong; the message (one line) names it."""


@dataclass(frozen=True)
class Param:
    path: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def is_group(self) -> bool:
        return self.path in GROUPS

    def active(self, chosen: dict[str, Any]) -> bool:
        return all(chosen.get(k) in values for k, values in self.when.items())

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)


def space_path(name: str) -> Path:
    """``default`` → ``configs/tuning/spaces/default.yaml``; anything with a suffix is a path."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml"):
        return path
    return CONFIG_DIR / "tuning" / "spaces" / f"{name}.yaml"


def load_space(name: str) -> list[Param]:
    """Read and check a space; TuningError names the first bad key."""
    path = space_path(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TuningError(f"tuning.space={name}: cannot read {path} ({type(e).__name__})") from e
    if not isinstance(raw, dict) or not raw:
        raise TuningError(f"tuning.space={name}: expected a mapping of config path -> distribution")
    params: list[Param] = []
    for key, spec in raw.items():
        params.append(_param(str(key), spec, {p.path: p for p in params}, path))
    return params


def _param(key: str, spec: Any, earlier: dict[str, Param], where: Path) -> Param:
    def bad(why: str) -> TuningError:
        return TuningError(f"tuning space {where.name}: {key}: {why}")

    if not isinstance(spec, dict):
        raise bad("expected {type: float|int|categorical, ...}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "when"}
    if unknown:
        raise bad(f"unknown field(s) {sorted(unknown)}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise bad(f"type={kind!r}; expected one of {list(KINDS)}")
    when = {}
    for cond, values in (spec.get("when") or {}).items():
        if cond not in earlier:
            raise bad(f"'when' names {cond!r}, which is not a key listed before it")
        values = tuple(values) if isinstance(values, list) else (values,)
        allowed = earlier[cond].choices
        if earlier[cond].kind != "categorical" or not set(values) <= set(allowed):
            raise bad(f"'when' {cond} in {list(values)}: not among its choices {list(allowed)}")
        when[cond] = values
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise bad("categorical needs a non-empty list 'choices'")
        if key in GROUPS:
            missing = [c for c in choices if not (CONFIG_DIR / key / f"{c}.yaml").is_file()]
            if missing:
                raise bad(f"no configs/{key}/{missing[0]}.yaml")
        return Param(key, kind, choices=tuple(choices), when=when)
    low, high = spec.get("low"), spec.get("high")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not math.isfinite(low) or not math.isfinite(high) or not low < high:
        raise bad(f"needs numbers low < high, got low={low!r} high={high!r}")
    log, step = bool(spec.get("log", False)), spec.get("step")
    if log and low <= 0:
        raise bad("log needs low > 0")
    if step is not None and (log and kind == "float" or not step > 0):
        raise bad(f"step={step!r}: a positive step, and not together with log for floats")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise bad("int needs whole low and high")
    return Param(key, kind, float(low), float(high), log, step, when=when)


def suggest(trial: Any, params: list[Param]) -> dict[str, Any]:
    """The trial's values of every active key, in space order."""
    chosen: dict[str, Any] = {}
    for p in params:
        if p.active(chosen):
            chosen[p.path] = p.suggest(trial)
    return chosen


def overrides(values: dict[str, Any]) -> list[str]:
    """Hydra overrides for chosen values: group choices first, then keys inside them."""
    groups = [f"{k}={v}" for k, v in values.items() if k in GROUPS]
    keys = [f"{k}={_text(v)}" for k, v in values.items() if k not in GROUPS]
    return groups + keys


def defaults(params: list[Param], base: Any) -> dict[str, Any]:
    """The base configuration's own value of every key active under it (trial 0)."""
    from omegaconf import OmegaConf

    chosen: dict[str, Any] = {}
    for p in params:
        if not p.active(chosen):
            continue
        if p.is_group:
            value = OmegaConf.select(base, f"{p.path}.name")
        else:
            value = OmegaConf.select(base, p.path)
        if value is None:
            raise TuningError(f"tuning space: {p.path} is not in the base configuration")
        chosen[p.path] = value
    return chosen


def _text(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)
