"""Ctrl-C/SIGTERM as a clean stop, the same way in every engine.

The first signal sets a flag that the round loop polls (``ObservedGrid``: between rounds and
every 0.1 s of a round), so the run ends ``interrupted`` with the last finished round saved;
a second signal raises ``KeyboardInterrupt`` and leaves at once. The flag is a
``threading.Event`` where the ServerApp runs in this process (the simulation engine), or a
:class:`StopFile` where it runs in another (the deployment engine's, under the SuperLink).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

LOGGER = logging.getLogger("fedyolo")


class Flag(Protocol):
    def is_set(self) -> bool: ...
    def set(self) -> None: ...
    def wait(self, timeout: float) -> bool: ...


class StopFile:
    """A stop flag raised by creating a file: the ``threading.Event`` subset the round loop
    uses (``is_set``, ``set``, ``wait``), across processes."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def is_set(self) -> bool:
        return self.path.exists()

    def set(self) -> None:
        self.path.touch()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def wait(self, timeout: float) -> bool:
        time.sleep(timeout)
        return self.is_set()


@contextlib.contextmanager
def interrupts_to(flag: Flag, armed: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """While inside: the first Ctrl-C/SIGTERM sets ``flag`` (when ``armed()``: before that,
    e.g. while the deployment's processes start, it leaves at once), a second one raises
    ``KeyboardInterrupt``. Only in the main thread (the only one signals reach)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if flag.is_set() or not armed():
            raise KeyboardInterrupt
        LOGGER.warning("%s: stopping the run (Ctrl-C again to leave now)", signal.strsignal(signum))
        flag.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
