"""The server side of fedyolo: one federation as a library call, its round loop and hooks.

    from fl_server import run
    summary = run(["federation.rounds=5"], callbacks=[lambda record: None])

Front door: ``run`` (``fl_server.api``), ``Summary``, ``RoundHook`` (``fl_server.hooks``),
``compose`` and ``ConfigError`` (``fl_server.config``); engines by name in ``fl_server.engines``.

The front door's names are imported on first use (PEP 562 ``__getattr__``): importing one
module of the package (``fl_server.cli`` for ``fedyolo --help``, ``fl_server.records`` from
``strategies``) then costs that module, not the whole library and its OpenCV.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fl_server.api import RoundResult, Summary, run
    from fl_server.config import ConfigError, compose
    from fl_server.hooks import STOP_STATUSES, RoundHook

_FRONT_DOOR = {
    "RoundResult": "fl_server.api",
    "Summary": "fl_server.api",
    "run": "fl_server.api",
    "ConfigError": "fl_server.config",
    "compose": "fl_server.config",
    "STOP_STATUSES": "fl_server.hooks",
    "RoundHook": "fl_server.hooks",
}

__all__ = [  # written out (not sorted(_FRONT_DOOR)): linters read it
    "STOP_STATUSES",
    "ConfigError",
    "RoundHook",
    "RoundResult",
    "Summary",
    "compose",
    "run",
]
assert sorted(__all__) == sorted(_FRONT_DOOR)


def __getattr__(name: str) -> Any:
    if name not in _FRONT_DOOR:
        raise AttributeError(f"module 'fl_server' has no attribute {name!r}")
    value = getattr(import_module(_FRONT_DOOR[name]), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_FRONT_DOOR])
