"""The Flower ServerApp: runs the federation (``fl_server.federation``) for a run directory.

The same ``serve()`` runs in both engines. In the deployment engine (``flwr run .``) the
module-level ``app`` reads the prepared run directory from the run config (``run-dir``); the
simulation engine gets an app bound to the run directory from ``server_app_for()``. ``serve``
owns how a run ends: completed, stopped, interrupted, or failed with its reason.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_server.federation import Federation, round_config
from fl_server.interrupts import StopFile
from fl_server.observed_grid import Interrupted
from fl_server.records import EventKind, Status
from fl_server.reporting import one_line
from fl_server.run_dir import RunDir, RunInUse, lost_rounds
from fl_server.tracking import mend_sessions

# round_config (what clients receive each round) lives in fl_server.federation; importable here
__all__ = ["app", "main", "round_config", "serve", "server_app_for"]

LOGGER = logging.getLogger("fedyolo")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing is downloaded at run time
    run_dir = str(context.run_config.get("run-dir", ""))
    if not run_dir:
        raise ValueError("run config 'run-dir' is empty: start runs with `fedyolo run`")
    # the deployment engine (deploy/local.py) turns Ctrl-C/SIGTERM into this file
    serve(grid, Path(run_dir), StopFile(RunDir(Path(run_dir)).interrupt))


def server_app_for(run_dir: Path, interrupt: threading.Event | None = None) -> ServerApp:
    """A ServerApp bound to ``run_dir`` (the simulation engine takes app objects).

    ``interrupt``: set by the engine on Ctrl-C/SIGTERM; the run then ends ``interrupted``.
    """
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, run_dir, interrupt)

    return bound


def _failed(run: RunDir, rnd: int, e: Exception) -> str:
    """Record why the run failed (the traceback in ``events.jsonl``, for a bug); the reason."""
    reason = one_line(e)
    LOGGER.error("the run failed after round %d: %s", rnd, reason)
    try:
        run.event(rnd, EventKind.RUN_FAILED, reason=reason, traceback=traceback.format_exc())
    except Exception as err:  # noqa: BLE001 - e.g. the full disk that failed the run
        LOGGER.error("could not record the failure in %s: %s", run.events, one_line(err))
    return reason


def _outcome(run: RunDir, status: Status) -> tuple[Status, str | None]:
    """A run whose every round aggregated nothing did not train: it failed, with the reason."""
    rounds = run.rounds()
    lost = lost_rounds(rounds)
    if status == Status.INTERRUPTED or not rounds or len(lost) < len(rounds):
        return status, None
    reason = (
        f"no round aggregated a client update: every client failed or was rejected in all "
        f"{len(rounds)} round(s); see {run.events}"
    )
    LOGGER.error("the run failed: %s", reason)
    return Status.FAILED, reason


def serve(grid: Grid, run_path: Path, interrupt: threading.Event | StopFile | None = None) -> None:
    """Run (or resume) the whole federation for the prepared run directory ``run_path``.

    An ``interrupt`` (Ctrl-C/SIGTERM, set by the engine) abandons the round in progress and
    ends the run ``interrupted``: the state of the last finished round stays, ready to resume.
    A failure ends the run ``failed`` with its reason in ``summary.json`` (and the traceback in
    ``events.jsonl``): the engine's caller reads the summary, it does not get the exception.
    """
    run = RunDir(run_path)
    try:
        with run.held(RunDir.SERVER_LOCK):
            _serve(grid, run, interrupt)
    except RunInUse as e:  # another server writes this run: nothing here may write to it
        LOGGER.error("%s", e)


def _serve(grid: Grid, run: RunDir, interrupt: threading.Event | StopFile | None) -> None:
    # a kill or power cut during an append: whole lines again before anything is appended
    torn = run.mend_torn_tails() | mend_sessions(run)
    if torn:
        LOGGER.warning("removed the torn last line of %s", ", ".join(torn))
    try:
        fed = Federation(grid, run)
    except Exception as e:  # noqa: BLE001 - said in summary.json, in one line
        run.write_summary(run.rounds(), status=Status.FAILED, reason=_failed(run, 0, e))
        return
    fed.grid.interrupt = interrupt
    status, reason = Status.FAILED, None
    try:
        if fed.cfg.resume is not None and run.state.exists():
            fed.start_resumed(torn)
        else:
            fed.start_fresh()
        fed.first_round = fed.round + 1
        fed.wait_for_clients(float(fed.cfg.engine.get("startup_timeout", 120)))
        status = fed.run_rounds()
        status, reason = _outcome(run, status)
    except Interrupted:
        LOGGER.warning("interrupted: the run stops after round %d; resume=%s", fed.round, run.path)
        status = Status.INTERRUPTED
    except Exception as e:  # noqa: BLE001 - said in summary.json, in one line
        reason = _failed(run, fed.round, e)
    finally:
        fed.finish(status, reason)
    if status == Status.COMPLETED:
        LOGGER.info("run finished: %s", run.summary)
