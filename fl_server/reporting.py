"""What a run tells the outside, round by round and at its end.

The round loop (``fl_server.federation``) hands each finished round's record to one object,
:class:`Reporting`, which owns the run's round hooks (``fl_server.hooks``) in their order:
ClearML (``fl_server.tracking``, which also hears every event), the summary writer
(``fl_server.run_dir``), then the config's and the caller's. At the end, whatever ended the run,
it writes ``summary.json`` and the plot, calls every hook's ``on_end`` and records ``run_end``
last. A hook that cannot start or fails in a round ends the run with :class:`RunFailed`, named
in one line.
"""

from __future__ import annotations

import logging

from fl_server import hooks as hooks_mod
from fl_server.records import EventKind, RoundRecord, Status
from fl_server.run_dir import RunDir, SummaryWriter
from fl_server.tracking import Tracker

LOGGER = logging.getLogger("fedyolo")


class RunFailed(RuntimeError):
    """The run cannot go on, for a reason a user can act on (named in one line)."""


def one_line(e: BaseException) -> str:
    """An error in one line: a ``RunFailed``'s own words, any other's with its type."""
    text = " ".join(str(e).split())
    return text if isinstance(e, RunFailed) else f"{type(e).__name__}: {text}"


class Reporting:
    """The run's tracker and round hooks: started with the run (fresh or resumed), called after
    every round, finished once."""

    def __init__(self, run: RunDir):
        self.run = run
        self.tracker: Tracker | None = None
        self.hooks: list = []  # none until started: the end still writes the run's summary

    @property
    def task_id(self) -> str | None:
        """The run's ClearML task (None before the tracker started)."""
        return self.tracker.task_id if self.tracker is not None else None

    def start(self, cfg, task_id: str | None = None) -> None:
        """Start the tracker (off when tracking.enabled=false; without tracking when ClearML
        fails to start) and the round hooks, in order: ClearML, the summary writer, then the
        user's (the first two are kept for the run's end even when one of the user's cannot
        start)."""
        self.tracker = tracker = Tracker.start(cfg, self.run, resume_task_id=task_id)
        builtin = [tracker]
        self.hooks = [*builtin, SummaryWriter(self.run, builtin)]
        self.hooks += user_hooks(cfg, self.run)

        def forward(rnd: int, kind: EventKind, details: dict) -> None:
            # the tracker's own trouble is not reported to itself
            if kind != EventKind.TRACKER_ERROR:
                tracker.report_event(rnd, kind, details)

        self.run.subscribe(forward)

    def on_round(self, rnd: int, record: RoundRecord) -> str | None:
        """Every round hook on the round's record; the first stop status asked for."""
        return call_hooks(self.hooks, rnd, record)

    def finish(self, rnd: int, status: Status, reason: str | None = None) -> None:
        """The end of the run (:func:`finish_run`)."""
        finish_run(self.run, self.hooks, self.task_id, rnd, status, reason)


def user_hooks(cfg, run: RunDir) -> list:
    """The config's ``hooks``, then the caller of ``fl_server.run`` (if waiting)."""
    paths = list(cfg.get("hooks") or [])
    try:
        hooks = hooks_mod.load_hooks(paths, run)
    except Exception as e:  # a user's hook that cannot start: the run fails, said so
        raise RunFailed(f"hooks={paths}: a hook could not start ({one_line(e)})") from e
    bridge = hooks_mod.CallerBridge.if_requested(run.path)
    if bridge is not None:
        hooks.append(bridge)
    return hooks


def call_hooks(hooks: list, rnd: int, record: RoundRecord) -> str | None:
    """Every round hook on ``record`` (``fl_server.hooks.call_on_round``, one at a time so
    that a failing hook is named); the first stop status asked for."""
    asked = None
    for hook in hooks:
        try:
            got = hooks_mod.call_on_round([hook], record)
        except Exception as e:
            name = type(hook).__name__
            raise RunFailed(f"round hook {name} failed in round {rnd}: {one_line(e)}") from e
        asked = asked or got
    return asked


def finish_run(
    run: RunDir, hooks: list, task: str | None, rnd: int, status: Status, reason: str | None
) -> None:
    """The end of a run, whatever ended it: ``summary.json``, the plot, every hook's
    ``on_end`` (one's failure does not cost the others), and last the ``run_end`` event."""
    if not hooks:  # the run failed before its hooks started: still write its summary
        hooks = [SummaryWriter(run, [])]
    try:
        summary = run.write_summary(run.rounds(), status=status, clearml_task=task, reason=reason)
    except OSError as e:  # e.g. a full disk: the caller finds summary.json unfinished
        LOGGER.error("could not write %s: %s", run.summary, one_line(e))
        return
    try:
        run.write_plot(run.rounds())
    except Exception as e:  # noqa: BLE001 - a plot must never hide the run's outcome
        LOGGER.error("could not write %s: %s", run.plot, one_line(e))
    for hook in hooks:
        try:
            hooks_mod.call_on_end([hook], summary)
        except Exception as e:  # noqa: BLE001 - one hook's failure must not cost the others
            name = type(hook).__name__
            LOGGER.error("round hook %s failed at the end of the run: %s", name, one_line(e))
    try:
        run.event(rnd, EventKind.RUN_END, status=status)  # last write: the run is complete
    except OSError as e:
        LOGGER.error("could not write %s: %s", run.events, one_line(e))
