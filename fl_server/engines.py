"""Where a federation runs: engines registered by name.

An engine is a function ``engine(run: RunDir, cfg: DictConfig) -> None`` that runs the prepared
run directory's federation to its end (the ServerApp writes the run directory; the engine only
starts and stops processes). Engines are found through the ``fedyolo.engines`` entry-point group
of installed packages (``pyproject.toml``), so the package that owns an engine registers it and
``fl_server`` imports none of them: ``simulation`` lives here (Flower's simulation engine),
``local-deployment`` in ``deploy.local``, and a new one is one more line in ``pyproject.toml``
plus ``configs/engine/<name>.yaml``.

An engine is trusted because it is installed (``fl_server.plugins``): a config names an engine
only by its registered name, never by an import path. What the entry point loads is checked to
be an engine function ``(run, cfg)`` before it is called.

This module is also the API an engine may use (``__all__``): the run directory (``RunDir``:
its files' names and readers), the statuses and event kinds it follows the run by, the stop
file and signal forwarding (``StopFile``, ``interrupts_to``). An engine imports these from
here, the config composer from ``fl_server.config`` and the user's API from ``fl_server.api``,
and nothing else of ``fl_server`` (``tests/fl_server/test_layers.py``), so ``fl_server``'s
other modules can change without breaking an engine. Light to import: config validation
imports it for the engines' names.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from fl_server import plugins
from fl_server.hooks import STOP_STATUSES
from fl_server.interrupts import StopFile, interrupts_to
from fl_server.records import EventKind, Status
from fl_server.run_dir import RunDir

__all__ = [
    "GROUP",
    "STOP_STATUSES",
    "Engine",
    "EventKind",
    "RunDir",
    "Status",
    "StopFile",
    "get",
    "interrupts_to",
    "names",
]

GROUP = "fedyolo.engines"

Engine = Callable[[Any, Any], None]


@cache
def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def names() -> list[str]:
    """The registered engine names."""
    return sorted(_entry_points())


def get(name: str) -> Engine:
    """The engine registered as ``name`` (a ``KeyError`` names the registered ones)."""
    eps = _entry_points()
    if name not in eps:
        raise KeyError(
            f"engine {name!r} is not registered (entry points {GROUP}: {names()}); "
            "is fedyolo installed (pip install -e .)?"
        )
    path = f"{eps[name].module}:{eps[name].attr}"  # installed metadata: trusted, still checked
    return plugins.load(path, plugins.ENGINE, (path,), f"config: engine.name={name}")
