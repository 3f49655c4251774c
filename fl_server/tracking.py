"""ClearML tracking of a run: one task, every round, every client, every guard decision.

The server alone reports (clients create no tasks; Ultralytics' ClearML callback is never
registered on them). ``tracking.mode``:

* ``online``: the ClearML server of the usual ``CLEARML_*`` variables or ``clearml.conf``;
* ``offline``: no server needed; the session is written under ``runs/<name>/clearml/`` and
  zipped when the run ends, to be imported into a server later (``fedyolo clearml-import``);
* ``auto`` (default): online when a server is configured (``CLEARML_API_HOST``, or a
  ``clearml.conf`` in ``CLEARML_CONFIG_FILE`` or the home directory), else offline.

Online, the server is asked first (``GET /debug.ping``, at most ``tracking.connect_timeout``
seconds): ClearML's own client retries an unreachable server for many minutes before
``Task.init`` returns. A server that refuses, never answers or cannot be resolved makes the run
go on offline, with a ``tracker_error`` event; the session is imported later as above.

What the task holds: the resolved config as hyperparameters (section ``fedyolo``); per round the
global mAP50/mAP50-95, precision and recall, mAP50-95 per class, the round time, aggregation time,
the server's memory and failures; per client (series ``client <id>``) examples, loss, train
seconds, bytes up and down, update norm, data-drift score and peak memory; a ``clients`` table
per round; the guard's decision (``guard/rolled back``, ``guard/on probation``, ``guard/relative
drop``); every event (rollback, data drift, failures...) as a scalar under ``events`` plus a text
line, with tags for rollbacks, guard stops and data drift; at the end the metrics plot,
``best.pt`` as an artifact and the best/final mAP as single values.

**Resume.** Online, a resumed run continues the same task (``Task.init(continue_last_task=id)``).
An offline session cannot be reopened by ClearML 2.1.12, so each server process writes its own
session; ``sessions.json`` lists them in order, and the import chains them into one task
(``Task.import_offline_session(..., previous_task_id=...)``).

Tracking never breaks training: every call is guarded; an error is logged, recorded as a
``tracker_error`` event, and the run goes on (after a failed start, without tracking).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import ssl
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fl_client.errors import MissingInput
from fl_server.clearml_adapter import (
    api_server_host,
    no_fork_hooks_from_task_init,
    no_reporting_in_forked_children,
    use_reporting_thread,
)
from fl_server.records import EventKind, Status
from fl_server.run_dir import RunDir, mend_torn_tail, parse_jsonl, replace_text

LOGGER = logging.getLogger("fedyolo")

TAGGED = {EventKind.ROLLBACK, EventKind.GUARD_STOP, EventKind.DATA_DRIFT}
CLIENT_SERIES = {
    "client examples": "num_examples",
    "client loss": "loss",
    "client train seconds": "train_seconds",
    "client bytes up": "bytes_up",
    "client bytes down": "bytes_down",
    "client update norm": "update_norm",
    "client data drift": "drift_score",
    "client RSS MB": "rss_mb",
}
TABLE = [
    ("id", "id"),
    ("examples", "num_examples"),
    ("loss", "loss"),
    ("train s", "train_seconds"),
    ("bytes up", "bytes_up"),
    ("bytes down", "bytes_down"),
    ("update norm", "update_norm"),
    ("drift", "drift_score"),
]


def server_configured() -> bool:
    """True when the environment or a clearml.conf names a ClearML server."""
    if os.environ.get("CLEARML_API_HOST"):
        return True
    conf = os.environ.get("CLEARML_CONFIG_FILE")
    candidates = [Path(conf)] if conf else [Path.home() / "clearml.conf"]
    return any(p.is_file() for p in candidates)


def resolve_mode(t, run) -> str:
    """``online`` or ``offline`` for ``tracking.mode`` (``t``); an online server that cannot be
    reached within ``t.connect_timeout`` means offline, with a ``tracker_error`` event."""
    mode = str(t.mode)
    if mode == "auto":
        mode = "online" if server_configured() else "offline"
    if mode == "online" and (why := unreachable(float(t.connect_timeout))):
        LOGGER.warning("%s; tracking goes on offline into %s", why, run.clearml)
        run.event(0, EventKind.TRACKER_ERROR, method="connect", error=why, fallback="offline")
        mode = "offline"
    return mode


def open_task(
    run, mode: str, project: str, name: str, task_type: str = "training", continue_task=False
):
    """A ClearML task of this process, reporting through a thread; offline, its session goes
    into ``run.clearml`` and is listed in ``sessions.json`` for ``fedyolo clearml-import``."""
    from clearml import Task

    current = Task.current_task()
    if current is not None:  # a task left open in this process (tests run many federations)
        current.close()
    offline = mode == "offline"
    if offline:
        # ClearML reads the cache dir at every use: the session goes into the run directory.
        os.environ["CLEARML_CACHE_DIR"] = str(run.clearml)
    Task.set_offline(offline)
    use_reporting_thread(Task)
    no_fork_hooks_from_task_init()  # Ray may fork while Task.init runs: see the adapter
    task = Task.init(
        project_name=project,
        task_name=name,
        task_type=task_type,
        reuse_last_task_id=False,
        continue_last_task=continue_task,
        auto_connect_frameworks=False,
        auto_connect_arg_parser=False,
        auto_connect_streams=False,
        auto_resource_monitoring=False,
    )
    no_reporting_in_forked_children()  # Ray forks its processes: see the adapter
    if offline:
        _record_session(run, str(task.id), Path(task.get_offline_mode_folder()))
    return task


def unreachable(timeout: float) -> str | None:
    """Why the configured ClearML API server cannot be reached within ``timeout`` s; None if it can.

    Any HTTP answer counts as reachable (credentials are ClearML's business). The probe runs in
    a daemon thread so that name resolution, which no socket timeout covers, is bounded too.
    """
    host = api_server_host()
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(f"{host}/debug.ping", timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - every failure is a reason to go offline
            reason = getattr(e, "reason", None) or e
            if isinstance(reason, ssl.SSLError):  # it answered; its certificate is ClearML's
                outcome.append(None)  # business (api.verify_certificate), as credentials are
                return
            silent = isinstance(reason, TimeoutError)
            outcome.append("" if silent else f"{type(reason).__name__}: {reason}")

    thread = threading.Thread(target=probe, name="clearml-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome or outcome[0] == "":
        return f"ClearML server {host} did not answer within {timeout:g} s"
    if outcome[0] is None:
        return None
    return f"ClearML server {host} unreachable ({outcome[0]})"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _guarded(method):
    """Run a tracker method; on any error log it, record a ``tracker_error`` and go on."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.task is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            LOGGER.warning("ClearML %s failed: %s: %s", method.__name__, type(e).__name__, e)
            self.run.event(
                self.round, EventKind.TRACKER_ERROR, method=method.__name__, error=str(e)
            )
            return None

    return wrapper


class Tracker:
    def __init__(self, run, task=None, mode: str = "off"):
        self.run, self.task, self.mode = run, task, mode
        self.round = 0
        self.task_id: str | None = None if task is None else str(task.id)
        self.summary_line: str | None = None  # for summary.md, once the task is closed

    # -- as a round hook of the server's loop (fl_server.hooks) --------------------------------
    def on_round(self, record: dict) -> None:
        self.report_round(record)

    def on_end(self, summary: dict) -> None:
        self.summary_line = self.finish(summary)

    @classmethod
    def start(cls, cfg, run, resume_task_id: str | None = None) -> Tracker:
        """The run's tracker; a tracker that does nothing when off or when ClearML fails."""
        if not bool(cfg.tracking.enabled):
            return cls(run)
        try:
            mode = resolve_mode(cfg.tracking, run)
            return cls(run, _init_task(cfg, run, mode, resume_task_id), mode)
        except Exception as e:  # noqa: BLE001 - the run goes on without tracking
            LOGGER.warning("ClearML could not start (%s: %s); tracking is off", type(e).__name__, e)
            run.event(0, EventKind.TRACKER_ERROR, method="start", error=f"{type(e).__name__}: {e}")
            return cls(run)

    @property
    def _logger(self):
        return self.task.get_logger()

    @_guarded
    def report_round(self, record: dict) -> None:
        rnd = int(record["round"])
        self.round = rnd
        log = self._logger
        scalars = {
            ("mAP", "mAP50"): record.get("map50"),
            ("mAP", "mAP50-95"): record.get("map50_95"),
            ("precision/recall", "precision"): record.get("precision"),
            ("precision/recall", "recall"): record.get("recall"),
            ("round", "seconds"): record.get("round_seconds"),
            ("round", "aggregate seconds"): record.get("aggregate_seconds"),
            ("round", "server RSS MB"): record.get("server_rss_mb"),
            ("round", "failures"): record.get("failures"),
            ("round", "clients lr0"): record.get("lr0"),
        }
        for name, v in (record.get("per_class") or {}).items():
            scalars[("per-class mAP50-95", str(name))] = v.get("map50_95")
        guard = record.get("guard") or {}
        if guard:
            scalars[("guard", "rolled back")] = int(bool(guard.get("rolled_back")))
            scalars[("guard", "on probation")] = int(bool(guard.get("probation")))
            scalars[("guard", "relative drop")] = guard.get("drop")
        for c in record.get("clients") or []:
            for title, key in CLIENT_SERIES.items():
                scalars[(title, f"client {c.get('id')}")] = c.get(key)
        for (title, series), value in scalars.items():
            if (v := _number(value)) is not None:
                log.report_scalar(title, series, v, iteration=rnd)
        rows = [[name for name, _ in TABLE]]
        for c in record.get("clients") or []:
            rows.append(["" if c.get(k) is None else c.get(k) for _, k in TABLE])
        if len(rows) > 1:
            log.report_table("clients", f"round {rnd}", iteration=rnd, table_plot=rows)
        # Offline: on disk before the next round, so a kill loses none. Online: sent in the
        # background; a server that goes away mid-run must not hold the round up.
        log.flush(wait=self.mode == "offline")

    @_guarded
    def report_event(self, rnd: int, kind: str, fields: dict) -> None:
        log = self._logger
        log.report_scalar("events", kind, 1.0, iteration=int(rnd))
        detail = {k: v for k, v in fields.items() if k != "reason"}
        reason = fields.get("reason", "")
        log.report_text(f"round {rnd}: {kind} {reason} {json.dumps(detail, default=str)}")
        if kind in TAGGED:
            self.task.add_tags([kind])

    @_guarded
    def finish(self, summary: dict) -> str | None:
        """Plot, best checkpoint, single values; close the task; the line for summary.md."""
        log = self._logger
        if self.run.plot.is_file():
            log.report_image("metrics", "run", iteration=0, local_path=str(self.run.plot))
        for name in ("best", "final"):
            if summary.get(name):
                log.report_single_value(f"{name} mAP50-95", float(summary[name]["map50_95"]))
        best = summary.get("best_checkpoint")
        if best and Path(best).is_file():
            self.task.upload_artifact(RunDir.BEST, artifact_object=Path(best), wait_on_upload=True)
        if summary.get("status") == Status.FAILED:
            self.task.mark_failed(status_reason="see events.jsonl")
        close_task(self.run, self.task, self.mode)
        if self.mode == "online":
            return f"ClearML: task {self.task_id} ({self.task.get_output_log_web_page()})."
        return (
            f"ClearML (offline): the session is in `clearml/` ({len(sessions(self.run))} "
            f"part(s)); import it into a server with `fedyolo clearml-import {self.run.path}`."
        )


def _init_task(cfg, run, mode: str, resume_task_id: str | None):
    offline = mode == "offline"
    name = str(cfg.tracking.task_name or run.path.name)
    if resume_task_id and offline:
        name += f" (resumed from {resume_task_id})"
    continue_task = resume_task_id if (resume_task_id and not offline) else False
    task = open_task(run, mode, str(cfg.tracking.project), name, continue_task=continue_task)
    task.connect(OmegaConf.to_container(cfg, resolve=True), name="fedyolo")
    task.add_tags([str(cfg.strategy.name), str(cfg.engine.name), str(cfg.transport.scheme)])
    LOGGER.info("ClearML %s task %s", mode, task.id)
    return task


def sessions(run) -> list[dict]:
    path = run.clearml / RunDir.SESSIONS
    return json.loads(path.read_text()) if path.is_file() else []


def _record_session(run, task_id: str, folder: Path) -> None:
    """Append this process's offline session to ``clearml/sessions.json`` (import order)."""
    entries = sessions(run) + [{"task_id": task_id, "folder": str(folder)}]
    run.clearml.mkdir(parents=True, exist_ok=True)
    replace_text(run.clearml / RunDir.SESSIONS, json.dumps(entries, indent=2) + "\n")


def close_task(run, task, mode: str) -> None:
    """Flush and close a task opened by :func:`open_task`. Offline, ClearML leaves the session
    folder beside the zip it closed it into: one copy is kept, the zip (which the import and
    ``offline_scalars`` read; a killed process leaves the folder)."""
    task.flush(wait_for_uploads=True)
    task.close()
    if mode != "offline":
        return
    for s in sessions(run):
        folder = Path(s["folder"])
        if s["task_id"] == str(task.id) and Path(f"{folder}.zip").is_file():
            shutil.rmtree(folder, ignore_errors=True)


def mend_sessions(run) -> dict[str, int]:
    """``mend_torn_tail`` on the ``metrics.jsonl`` and ``log.jsonl`` of the sessions a killed
    process left as folders (ClearML appends a batch of events per line, often over a page, so a
    kill can cut one short; its import would warn and send the batch before it again). The bytes
    removed, per file (relative to the run). For a resume, before it opens its own session."""
    torn = {}
    for s in sessions(run):
        folder = Path(s["folder"])
        if not folder.resolve().is_relative_to(run.path.resolve()):
            continue  # a copied run's list names the original's folders: not this run's files
        for name in ("metrics.jsonl", "log.jsonl"):
            if n := mend_torn_tail(folder / name):
                torn[os.path.relpath(folder / name, run.path)] = n
    return torn


def _session_file(folder: Path, name: str) -> str | None:
    """A file of an offline session, from its folder or, once closed, its zip."""
    if (folder / name).is_file():
        return (folder / name).read_text()
    zipped = Path(f"{folder}.zip")
    if zipped.is_file():
        with zipfile.ZipFile(zipped) as z:
            if name in z.namelist():
                return z.read(name).decode()
    return None


def import_offline(run) -> str:
    """Import the run's offline sessions into the configured server as one task; its id.

    Each session is its zip when the server process closed it, else the folder a killed process
    left behind, whose last line the kill may have cut short: that line is removed first (with
    no server writing the run), else ClearML's import warns and sends the batch before it
    again. Later sessions continue the task the first one became.
    """
    from clearml import Task

    with run.held(RunDir.SERVER_LOCK, create=False):  # RunInUse while a server writes it
        if torn := mend_sessions(run):
            LOGGER.warning("removed the torn last line of %s", ", ".join(torn))
    task_id = None
    for s in sessions(run):
        folder = Path(s["folder"])
        zipped = Path(str(folder) + ".zip")
        source = zipped if zipped.is_file() else folder
        imported = Task.import_offline_session(str(source), previous_task_id=task_id)
        task_id = task_id or imported
    if task_id is None:
        raise MissingInput(f"no offline ClearML session in {run.clearml}")
    return str(task_id)


def offline_scalars(run) -> dict[tuple[str, str], dict[int, float]]:
    """The scalars of the run's offline sessions, read from their ``metrics.jsonl`` files.

    ``{(title, series): {iteration: value}}``, sessions in order (a resumed run's later session
    overrides an iteration both hold). For checks and quick looks without a server.
    """
    out: dict[tuple[str, str], dict[int, float]] = {}
    for s in sessions(run):
        text = _session_file(Path(s["folder"]), "metrics.jsonl")
        if text is None:
            continue
        for batch in parse_jsonl(text, f"{s['folder']}/metrics.jsonl"):
            for ev in batch:
                if ev.get("type") == "training_stats_scalar":
                    series = out.setdefault((ev["metric"], ev["variant"]), {})
                    series[int(ev["iter"])] = float(ev["value"])
    return out
