"""The server side of fedyolo: one federation as a library call, its round loop and hooks.

    from fl_server import run
    summary = run(["federation.rounds=5"], callbacks=[lambda record: None])

Front door: ``run`` (``fl_server.api``), ``Summary``, ``RoundHook`` (``fl_server.hooks``),
``compose`` and ``ConfigError`` (``fl_server.config``); engines by name in ``fl_server.engines``.
"""

from fl_server.api import RoundResult, Summary, run
from fl_server.config import ConfigError, compose
from fl_server.hooks import STOP_STATUSES, RoundHook

__all__ = [
    "STOP_STATUSES",
    "ConfigError",
    "RoundHook",
    "RoundResult",
    "Summary",
    "compose",
    "run",
]
