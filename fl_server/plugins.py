"""Code named by a configuration runs only when the person starting the run trusts it.

A config is data that travels: a colleague's ``--from`` file, a study's ``best.yaml``, a run
directory handed over for ``resume=``. Three of its keys name code: ``strategy._target_`` (a
strategy class), ``hooks`` (round hooks) and ``engine.name``. Importing that code runs it (a
module's top level), and calling it runs more (``strategy._target_=torch.load`` with a crafted
``.pt`` ran the pickle's code during validation; Hydra's blocklist stops ``os.system``, not
that). So a plug-in is imported only when it is trusted, and trusted only when:

* an installed package declares it as an entry point of its kind's group (``GROUPS``): installing
  a package is already the decision to run its code (fedyolo's own hooks are declared so in
  ``pyproject.toml``; its built-in strategies are a registry by name); or
* the person starting this process names it, exactly, on the command line:
  ``fedyolo run --trust-plugin my_pkg.mod:Thing`` (repeatable; ``grant`` from Python). An exact
  import path, not a package or a pattern: trusting one class trusts nothing beside it.

Nothing a config file or a Hydra override says grants trust: ``strategy._target_=x`` alone is a
name, not a decision. What is imported is checked to be the right kind (``Kind``) before
anything calls or instantiates it; every refusal is one line naming the plug-in and how to
trust it.

How the grant reaches the ServerApp, which runs in another process (local deployment) or
container (compose): ``fl_server.config.compose`` records this process's grant in the config as
``trusted_plugins`` and the run directory's ``config.yaml`` carries it; the ServerApp honours
it. That file is written by fedyolo, from the command line of the process that starts the run,
right before its engine starts the ServerApp. Every way fedyolo reads a ``config.yaml`` back in
(``resume=``, ``fedyolo distill``, the compose engine's restart) composes it again and
*replaces* ``trusted_plugins`` with the current process's grant, and an override of
``trusted_plugins`` is refused. So a run directory or config handed to someone else, edited or
not, grants nothing: resuming a plug-in run needs ``--trust-plugin`` again.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from fl_client.lazy import lazy
from fl_server.schema import ConfigError

flwr_strategy = lazy("flwr.serverapp.strategy")  # a strategy plug-in is checked, not --help

KEY = "trusted_plugins"  # the config key that carries the grant to the ServerApp
FLAG = "--trust-plugin"
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = re.compile(rf"({_IDENT}(?:\.{_IDENT})*):({_IDENT})")

_granted: tuple[str, ...] = ()  # this process's command line (``grant``)


class PluginError(ConfigError):
    """A plug-in was refused (not trusted, not importable, or not the right kind)."""


@dataclass(frozen=True)
class Kind:
    """A kind of plug-in: its entry-point group and what an imported object must be."""

    name: str
    group: str
    expected: str
    check: Callable[[Any], bool]


def _is_strategy_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, flwr_strategy.Strategy)


def _is_hook_class(obj: Any) -> bool:
    return inspect.isclass(obj) and callable(getattr(obj, "on_round", None))


def _takes(obj: Any, n: int) -> bool:
    """A function that ``n`` positional arguments can be passed to."""
    if not inspect.isfunction(obj):
        return False
    try:
        inspect.signature(obj).bind(*[None] * n)
    except TypeError:
        return False
    return True


def _is_engine(obj: Any) -> bool:
    return _takes(obj, 2)


STRATEGY = Kind("strategy", "fedyolo.strategies", "a Flower Strategy class", _is_strategy_class)
HOOK = Kind(
    "round hook", "fedyolo.hooks", "a round hook class (with on_round(record))", _is_hook_class
)
ENGINE = Kind("engine", "fedyolo.engines", "an engine function engine(run, cfg)", _is_engine)


def _is_command(obj: Any) -> bool:
    return _takes(obj, 1) and bool(inspect.getdoc(obj))


def _is_run_source(obj: Any) -> bool:
    return _takes(obj, 2)


COMMAND = Kind(  # fl_server.cli: the function adds its arguments and set_defaults(handler=...)
    "command", "fedyolo.commands", "a command function add(parser) with a docstring", _is_command
)
RUN_SOURCE = Kind(  # fl_server.config: resume=<scheme>://.../<run> fetched into a folder
    "run source", "fedyolo.run_sources", "a run source function fetch(url, dest)", _is_run_source
)
GROUPS = {k.group: k for k in (STRATEGY, HOOK, ENGINE, COMMAND, RUN_SOURCE)}


def normalize(path: str) -> str | None:
    """``module:attr`` for an exact import path (``module:attr`` or dotted ``module.attr``),
    else None. The attribute is one name: ``pkg.mod:Cls``, never ``pkg.mod:Cls.method``."""
    text = str(path).strip()
    if ":" not in text:
        module, _, attr = text.rpartition(".")
        text = f"{module}:{attr}"
    return text if _PATH.fullmatch(text) else None


def registered(kind: Kind) -> dict[str, str]:
    """Each name installed packages register in ``kind``'s group, with its import path (read
    from their metadata, in their order; nothing is imported)."""
    return {ep.name: f"{ep.module}:{ep.attr}" for ep in entry_points(group=kind.group)}


def installed(kind: Kind) -> frozenset[str]:
    """The import paths installed packages declare as entry points of ``kind``'s group (read
    from their metadata; nothing is imported)."""
    return frozenset(registered(kind).values())


def _exact(paths: Iterable[str]) -> list[str]:
    out = []
    for path in paths:
        exact = normalize(path)
        if exact is None:
            raise PluginError(
                f"{FLAG} {path!r}: expected an exact import path like my_pkg.my_module:MyClass"
            )
        out.append(exact)
    return out


def grant(paths: Iterable[str]) -> tuple[str, ...]:
    """Trust exactly these import paths in this process (``--trust-plugin``), replacing an
    earlier grant (``grant([])`` revokes it); the grant. Raises PluginError (one line) for a
    value that is not an exact import path."""
    global _granted
    _granted = tuple(dict.fromkeys(_exact(paths)))
    return _granted


def granted() -> tuple[str, ...]:
    """What this process's command line trusts (``grant``)."""
    return _granted


@contextmanager
def trusting(paths: Iterable[str]) -> Iterator[tuple[str, ...]]:
    """``grant`` for the duration of a ``with`` block (tests, a library caller's one run)."""
    global _granted
    before = _granted
    try:
        yield grant([*before, *paths])
    finally:
        _granted = before


def add_flag(parser: Any) -> None:
    """The ``--trust-plugin`` option of a command that composes a run's config."""
    parser.add_argument(
        FLAG,
        dest="trust_plugin",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="import this plug-in (strategy._target_, a hook) for this run; repeatable; "
        "a config file or an override alone never does",
    )


def recorded(cfg: Any) -> tuple[str, ...]:
    """The grant a composed config carries (``KEY``); none for a config without it."""
    values = cfg.get(KEY) if cfg is not None else None
    return tuple(str(v) for v in values or ())


def refuse_overrides(overrides: Iterable[str], where: str = "config") -> None:
    """An override (command line, ``--from`` file, best.yaml) cannot set ``KEY``."""
    for o in overrides:
        key = str(o).partition("=")[0].lstrip("+~").split(".")[0].split("@")[0].strip()
        if key == KEY:
            raise PluginError(f"{where}: {o!r}: {KEY} is set by {FLAG} on the command line only")


def _refusal(where: str, kind: Kind, exact: str) -> PluginError:
    return PluginError(
        f"{where}: {kind.name} {exact} is not trusted, so it was not imported; "
        f"to run its code, pass {FLAG} {exact} (this run only) "
        f"or install it as a {kind.group} entry point"
    )


def load(path: str, kind: Kind, trusted: Iterable[str], where: str) -> Any:
    """The object at ``path``, imported only if trusted (``trusted`` or installed) and
    returned only if it is ``kind``; nothing is called. Raises PluginError (one line)."""
    exact = normalize(path)
    if exact is None:
        raise PluginError(
            f"{where}: {str(path)!r} is not an import path like my_pkg.my_module:MyClass"
        )
    if exact not in set(trusted) | installed(kind):
        raise _refusal(where, kind, exact)
    module, _, attr = exact.partition(":")
    try:
        obj = getattr(import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise PluginError(f"{where}: cannot import {exact}: {e}") from e
    if not kind.check(obj):
        what = type(obj).__name__ if not inspect.isclass(obj) else f"class {obj.__name__}"
        raise PluginError(
            f"{where}: {exact} is a {what}, not {kind.expected}; refused before any call"
        )
    return obj
