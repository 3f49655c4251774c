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
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from fl_server import plugins

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
