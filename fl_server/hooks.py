"""Round hooks: code that runs after every round of the server's loop and may stop the run.

A hook sees each finished round's record (exactly the line written to ``metrics.jsonl``) and,
at the end, the summary (``summary.json``'s content)::

    class MyHook:
        def on_round(self, record: dict) -> str | None:   # a stop status, or None to go on
            return "stopped" if record["map50_95"] > 0.5 else None

        def on_end(self, summary: dict) -> None: ...

A status other than ``None`` stops the run cleanly after that round: every file of the run
directory is written as for any other end, and ``summary.json``'s ``status`` is that status
(one of ``STOP_STATUSES``). ``on_end`` is optional.

Hooks reach the loop in three ways:

* built in: ClearML tracking and the summary writer are hooks of the loop
  (``fl_server.server_app``);
* by import path in the config, run inside the ServerApp's process whatever the engine:
  ``hooks=[my_pkg.my_module:MyHook]`` (the class is called with the ``RunDir``). Named in a
  config, a hook is imported only if trusted: declared in an installed package's
  ``fedyolo.hooks`` entry points, or granted with ``--trust-plugin my_pkg.my_module:MyHook``
  (``fl_server.plugins``);
* from the caller of ``fl_server.run(..., callbacks=[...])``, in the caller's process. The
  ServerApp may run in another process (the deployment engine) or on another machine sharing
  the run directory, so these go through it: after each round the loop writes the round's
  record to ``control/request-<n>.json`` and waits for the caller's verdict in
  ``control/verdict-<n>.json`` (``CallerBridge``), which the caller's ``Watcher`` writes after
  running the callbacks. One mechanism for every engine, tested in both.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from omegaconf import OmegaConf

from fl_server import plugins
from fl_server.records import RoundRecord, Status
from fl_server.run_dir import RunDir

LOGGER = logging.getLogger(__name__)

# plain strings, so that the message naming them reads as before
STOP_STATUSES = (Status.STOPPED.value, Status.PRUNED.value)
CONTROL = RunDir.CONTROL


@runtime_checkable
class RoundHook(Protocol):
    def on_round(self, record: RoundRecord) -> str | None: ...


def check_status(status: str | None, who: str) -> str | None:
    if status is not None and status not in STOP_STATUSES:
        raise ValueError(f"{who} asked to stop with status {status!r}; use one of {STOP_STATUSES}")
    return status


def call_on_round(hooks: Sequence[Any], record: RoundRecord) -> str | None:
    """Run every hook on ``record``; the first stop status asked for (all hooks still run)."""
    stop = None
    for hook in hooks:
        asked = check_status(hook.on_round(record), type(hook).__name__)
        stop = stop or asked
    return stop


def call_on_end(hooks: Sequence[Any], summary: dict) -> None:
    for hook in hooks:
        on_end = getattr(hook, "on_end", None)
        if on_end is not None:
            on_end(summary)


def hook_classes(paths: Sequence[str], trusted: Sequence[str]) -> list[type]:
    """The hook classes named by import path (``module:attr``) in the config, each imported only
    if trusted (``fl_server.plugins``: installed in ``fedyolo.hooks`` or granted by
    ``--trust-plugin``) and checked to be a class with ``on_round`` before anything calls it.
    Raises ``PluginError`` (one line)."""
    return [plugins.load(str(p), plugins.HOOK, trusted, "config: hooks") for p in paths]


def load_hooks(paths: Sequence[str], run: Any, trusted: Sequence[str] | None = None) -> list[Any]:
    """Hooks named by import path in the config, built with the ``RunDir``.

    ``trusted``: the grant the run's ``config.yaml`` carries (``fl_server.plugins``) unless
    given."""
    if trusted is None:
        trusted = plugins.recorded(OmegaConf.load(run.config)) if paths else ()
    return [cls(run) for cls in hook_classes(paths, trusted)]


def _path(run_path: Path, kind: str, server_round: int) -> Path:
    return run_path / CONTROL / f"{kind}-{server_round}.json"


def _write_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class CallerBridge:
    """Server side: hands each round's record to the caller and waits for its verdict.

    Active when the caller asked for it (``control/caller.json`` exists, written by ``Watcher``
    before the engine starts). A caller that does not answer within ``timeout`` seconds is
    logged and the run goes on: a hung notebook must not hang a fleet.
    """

    def __init__(self, run_path: Path, timeout: float = 600.0, poll: float = 0.05):
        self.run_path, self.timeout, self.poll = run_path, timeout, poll

    @classmethod
    def if_requested(cls, run_path: Path) -> CallerBridge | None:
        marker = RunDir(run_path).caller
        if not marker.is_file():
            return None
        timeout = float(json.loads(marker.read_text()).get("timeout", 600.0))
        return cls(run_path, timeout)

    def on_round(self, record: RoundRecord) -> str | None:
        rnd = int(record["round"])
        path = _path(self.run_path, "verdict", rnd)
        path.unlink(missing_ok=True)  # a verdict left from before a resume is not this one's
        _write_atomic(_path(self.run_path, "request", rnd), record)
        deadline = time.monotonic() + self.timeout
        while not path.is_file():
            if time.monotonic() > deadline:
                LOGGER.warning(
                    "no verdict from the caller's callbacks for round %s in %.0f s; going on",
                    record["round"],
                    self.timeout,
                )
                return None
            time.sleep(self.poll)
        verdict = json.loads(path.read_text())
        path.unlink()
        return check_status(verdict.get("stop"), "a caller callback")


class Watcher:
    """Caller side: runs ``callbacks`` on each round the bridge hands over, answers its verdict.

    Runs in a thread of the process that called ``fl_server.run`` while the engine runs. A
    callback that raises stops the run after that round (status ``stopped``) and the error is
    re-raised by ``fl_server.run`` once the run has ended cleanly.
    """

    def __init__(self, run_path: Path, callbacks: Sequence[Any], timeout: float = 600.0):
        self.run_path = run_path
        self.callbacks = list(callbacks)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedyolo-watcher", daemon=True)
        control = run_path / CONTROL
        for p in control.glob("*.json") if control.exists() else []:
            p.unlink()  # requests and verdicts of an earlier process (e.g. before a resume)
        _write_atomic(RunDir(run_path).caller, {"timeout": timeout, "pid": os.getpid()})

    @staticmethod
    def forget(run_path: Path) -> None:
        """Remove a caller marker left by a caller that was killed (its ``__exit__`` never ran),
        so a later run without callbacks does not wait for verdicts nobody will write."""
        RunDir(run_path).caller.unlink(missing_ok=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.forget(self.run_path)

    def _loop(self) -> None:
        control = self.run_path / CONTROL
        while not self._stop.is_set():
            requests = sorted(
                control.glob("request-*.json"), key=lambda p: int(p.stem.split("-")[1])
            )
            for request in requests:
                record = json.loads(request.read_text())
                request.unlink()
                self._answer(record)
            self._stop.wait(0.05)

    def _answer(self, record: RoundRecord) -> None:
        stop = None
        if self.error is None:
            try:
                stop = call_on_round(self.callbacks, record)
            except BaseException as e:  # noqa: BLE001 - handed back to the caller after the run
                LOGGER.error("a callback failed in round %s: %s", record.get("round"), e)
                self.error, stop = e, Status.STOPPED
        _write_atomic(_path(self.run_path, "verdict", int(record["round"])), {"stop": stop})
