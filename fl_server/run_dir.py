"""The run directory: the files users' scripts and dashboards read (see README, "Run directory").

``runs/<name>/``: ``config.yaml``, ``manifest.json``, ``metrics.jsonl`` (one line per finished
round), ``events.jsonl``, ``summary.json``, ``summary.md``, ``metrics.png``, ``best.pt``,
``last.pt``. Files are appended a whole line at a time or atomically replaced, so a run stopped
at any moment leaves readable files; a replacement that fails (a full disk) removes its ``.tmp``
and raises. A kill or a power cut in the middle of an append can leave the last line without
its end: readers leave such a line out (``parse_jsonl``), and a resume removes it
(``mend_torn_tail``) before it appends again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from fl_client.errors import UserError
from fl_client.lazy import lazy
from fl_server.records import EventKind, RoundRecord, Status

LOGGER = logging.getLogger("fedyolo")
matplotlib = lazy("matplotlib")
plt = lazy("matplotlib.pyplot")

METRIC_KEYS = ("map50", "map50_95", "precision", "recall")


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: through ``<path>.tmp``, removed if anything fails."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    replace_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def append_jsonl(path: Path, obj: Mapping[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(_clean(obj)) + "\n")
        f.flush()


class RunInUse(UserError, RuntimeError):
    """Another process holds the run (``RunDir.held``): it is running or resuming it."""


class CorruptRecord(UserError, ValueError):
    """A line of a JSON-lines file, before its last, that is not JSON: the file was damaged, not
    cut short (a torn last line is left out by the readers, not this)."""


def parse_jsonl(text: str, source: str) -> list[Any]:
    """The records of JSON-lines ``text``, one per line ending in a newline. A last line without
    its newline is an append under way, or one a kill cut short: kept if it is whole JSON, left
    out if not. Any other line that is not JSON raises ``CorruptRecord`` naming ``source`` and
    the line."""
    *lines, tail = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise CorruptRecord(f"{source}: line {number} is not JSON ({e})") from None
    if tail.strip():
        with contextlib.suppress(ValueError):  # else torn: an append under way or cut short
            records.append(json.loads(tail))
    return records


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return parse_jsonl(path.read_text(), str(path))


def mend_torn_tail(path: Path) -> int:
    """Make ``path`` end with a whole line, so the next append starts a line of its own: a last
    line without its newline (a kill or power cut during an append) is removed when it is not
    JSON and given its newline when it is. Returns the bytes removed (0: none). Only for a file
    no process is appending to (a resumed run's, before it writes)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if not data or data.endswith(b"\n"):
        return 0
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        with path.open("r+b") as f:
            f.truncate(start)
            os.fsync(f.fileno())
        return len(data) - start
    with path.open("ab") as f:
        f.write(b"\n")
    return 0


def lost_rounds(rounds: list[dict]) -> list[int]:
    """The finished rounds that aggregated no client update (their global model is unchanged)."""
    return [int(r["round"]) for r in rounds if not r.get("clients")]


class RunDir:
    """Paths and writers of one run directory.

    The class constants are the run files' names, written here and nowhere else
    (``tests/fl_server/test_run_dir_names.py``): code that needs a run's file asks a ``RunDir``
    (``RunDir(path).summary``) or, for a name alone, the constant (``RunDir.BEST``).
    Constructing one creates nothing, so ``RunDir(path)`` also reads a user's existing run.
    """

    CONFIG = "config.yaml"
    MANIFEST = "manifest.json"
    METRICS = "metrics.jsonl"
    EVENTS = "events.jsonl"
    SUMMARY = "summary.json"
    SUMMARY_MD = "summary.md"
    PLOT = "metrics.png"
    BEST = "best.pt"
    LAST = "last.pt"
    DATA = "data"
    WORK = ".work"
    STATE = "server_state.npz"
    CLEARML = "clearml"
    INTERRUPT = ".interrupt"
    LOCK = ".lock"  # held by the fedyolo process running the run (RunDir.held)
    SERVER_LOCK = ".server.lock"  # held by the server writing the run (RunDir.held)
    LOGS = "logs"
    FLWR_HOME = ".flwr"
    CONTROL = "control"  # the round hooks' bridge to a caller's process (fl_server.hooks)
    TEACHER = "teacher.pt"  # a distillation run's copy of its teacher (fl_client.distill)
    DATA_CHECK = "data_check.json"  # the data check's report (fl_server.data.check)
    EVAL = "eval"  # per-image matches of the held-out evaluations (output.save_matches)
    # Inside the folders above.
    SERVER_VAL = "server_val"  # data/: the server's held-out set (fl_server.data.partition)
    CLIENT_SHARD = "client_"  # data/: client i's shard is client_<i> (fl_server.data.partition)
    REPAIRED = "repaired_labels"  # data/: the data check's cleaned label copies
    CANDIDATE = "candidate.pt"  # .work/: the aggregate being evaluated before it is promoted
    REFERENCE = "reference.pt"  # .work/: the guard's reference model, evaluated on resume
    CLIENT_UPDATE = "client_update.pt"  # .work/: an aggregate without a client (attribution)
    SESSIONS = "sessions.json"  # clearml/: the offline sessions in import order
    CALLER = "caller.json"  # control/: the caller's request for verdicts (fl_server.hooks)

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / self.CONFIG
        self.manifest = self.path / self.MANIFEST
        self.metrics = self.path / self.METRICS
        self.events = self.path / self.EVENTS
        self.summary = self.path / self.SUMMARY
        self.summary_md = self.path / self.SUMMARY_MD
        self.plot = self.path / self.PLOT
        self.best = self.path / self.BEST
        self.last = self.path / self.LAST
        self.data = self.path / self.DATA  # the run's client shards and server validation set
        self.work = self.path / self.WORK  # scratch (Ultralytics' validator output)
        self.state = self.path / self.STATE  # what a resume needs (fl_server/state.py)
        self.clearml = self.path / self.CLEARML  # the offline ClearML session
        # Created by the deployment engine on Ctrl-C/SIGTERM: its ServerApp runs in a process
        # of the SuperLink's, not in the one that got the signal (fl_server.interrupts).
        self.interrupt = self.path / self.INTERRUPT
        self.logs = self.path / self.LOGS  # the deployment engines' process and container logs
        self.flwr_home = self.path / self.FLWR_HOME  # their Flower home: keys, certificates
        self.control = self.path / self.CONTROL
        self.teacher = self.path / self.TEACHER
        self.data_check = self.path / self.DATA_CHECK
        self.eval_matches = self.path / self.EVAL
        self.server_val = self.data / self.SERVER_VAL
        self.server_val_yaml = self.server_val / "data.yaml"  # a dataset's file, not only a run's
        self.repaired_labels = self.data / self.REPAIRED
        self.candidate = self.work / self.CANDIDATE
        self.reference = self.work / self.REFERENCE
        self.client_update = self.work / self.CLIENT_UPDATE
        self.clearml_sessions = self.clearml / self.SESSIONS
        self.caller = self.control / self.CALLER
        self._listeners: list[Callable[[int, EventKind, dict], None]] = []

    def client_shard(self, i: int) -> Path:
        """Client ``i``'s shard folder (``data/client_<i>``, holding its ``data.yaml``)."""
        return self.data / f"{self.CLIENT_SHARD}{i}"

    def subscribe(self, listener: Callable[[int, EventKind, dict], None]) -> None:
        """Call ``listener(round, kind, details)`` for every event from now on (the tracker)."""
        self._listeners.append(listener)

    def event(self, server_round: int, kind: EventKind, **details: Any) -> None:
        """Append one event to ``events.jsonl`` and tell the listeners. ``kind`` must be an
        ``EventKind`` (``fl_server.records``): a bare string is a bug, so a kind the reference
        page does not list cannot be written."""
        if not isinstance(kind, EventKind):
            raise TypeError(f"event kind {kind!r} is not an EventKind (fl_server.records)")
        append_jsonl(self.events, {"round": server_round, "kind": kind, **details})
        for listener in self._listeners:
            listener(server_round, kind, details)

    def read_events(self) -> list[dict]:
        """The events written so far (``events.jsonl``; none before the first)."""
        return read_jsonl(self.events)

    def read_summary(self) -> dict | None:
        """``summary.json`` as written, or None where there is none or it cannot be read."""
        try:
            return json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None

    def add_round(self, record: RoundRecord) -> None:
        append_jsonl(self.metrics, record)

    @contextlib.contextmanager
    def held(self, name: str = LOCK, *, create: bool = True) -> Iterator[None]:
        """Hold the run for this process: an exclusive ``flock`` on ``name`` (``.lock``: the
        ``fedyolo`` process running the run; ``.server.lock``: the server writing it), which
        the kernel releases when the process ends, however it ends. Another process holding it
        raises ``RunInUse`` with its pid: two servers appending to one run directory would
        interleave its rounds. ``create=False``: a missing file means nobody holds it. Where
        the file system has no locks (some network mounts) it warns and goes on unlocked."""
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self.path / name, flags, 0o600)
        except FileNotFoundError:
            if create:
                raise
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise RunInUse(
                    f"run directory {self.path} is in use by another fedyolo process (pid "
                    f"{holder}, or a process it started): wait for it to end, or stop it "
                    "(Ctrl-C) before resuming"
                ) from None
            except OSError as e:  # ENOLCK, EOPNOTSUPP: no locks on this file system
                LOGGER.warning("%s: cannot lock (%s); going on without it", self.path / name, e)
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def mend_torn_tails(self) -> dict[str, int]:
        """``mend_torn_tail`` on ``metrics.jsonl`` and ``events.jsonl``: the bytes removed per
        file, for the files that had a torn last line (a resume, before its first write)."""
        torn = {name: mend_torn_tail(self.path / name) for name in (self.METRICS, self.EVENTS)}
        return {name: n for name, n in torn.items() if n}

    def rounds(self) -> list[RoundRecord]:
        """The finished rounds' records, as ``add_round`` wrote them (``metrics.jsonl``)."""
        return cast(list[RoundRecord], read_jsonl(self.metrics))

    def client_work(self) -> dict[str, float]:
        """What the clients spent over the run: ``train_seconds`` and ``bytes`` (up and down)
        of every recorded round's replies plus those of rounds discarded (``round_discarded``,
        ``federation.overlap_eval``): work done is work paid for, used or not."""
        rounds = self.rounds()
        work = {
            "train_seconds": sum(c.get("train_seconds", 0.0) for r in rounds for c in r["clients"]),
            "bytes": sum(c["bytes_up"] + c["bytes_down"] for r in rounds for c in r["clients"]),
        }
        for e in self.read_events():
            if e.get("kind") == EventKind.ROUND_DISCARDED:
                work["train_seconds"] += float(e.get("client_train_seconds") or 0.0)
                work["bytes"] += float(e.get("bytes") or 0)
        return work

    def rewrite_rounds(self, rounds: list[RoundRecord]) -> None:
        """Replace ``metrics.jsonl`` atomically (resume drops a round the state does not cover)."""
        replace_text(self.metrics, "".join(json.dumps(_clean(r)) + "\n" for r in rounds))

    def write_summary(
        self,
        rounds: list[dict],
        status: Status,
        clearml_task: str | None = None,
        reason: str | None = None,
    ) -> dict:
        """summary.json from the finished rounds, all on the server's held-out set.

        ``best``: the best accepted round by the drift guard's metric (what ``best.pt`` holds;
        a rolled-back round's model is never a candidate). The initial model (round 0) is a
        candidate too: a federation that never beats its pre-trained start keeps the start.
        Ties go to the earlier round, as in the guard. ``final``: the model the run ended
        with, which after a rollback in the last round is the restored one, not the rejected.
        ``rounds_lost``: finished rounds that aggregated no client update (every client failed
        or was rejected: the global model did not change). ``reason``: why the run failed.
        """

        def pick(r: dict | None) -> dict | None:
            return None if r is None else {"round": r["round"], **{k: r[k] for k in METRIC_KEYS}}

        initial = [
            {"round": 0, **e} for e in self.read_events() if e["kind"] == EventKind.INITIAL_EVAL
        ][:1]
        accepted = initial + [
            r
            for r in rounds
            if r.get("map50_95") is not None
            and not r.get("guard", {}).get("rolled_back")
            and not r.get("guard", {}).get("probation")  # never best.pt either
        ]
        metric = rounds[-1].get("guard", {}).get("metric", "map50_95") if rounds else "map50_95"
        best = max(accepted, key=lambda r: r[metric], default=None)
        final = rounds[-1] if rounds else None
        if final is not None and final.get("guard", {}).get("rolled_back"):
            final = next(
                (r for r in reversed(rounds) if r["weights_sha256"] == final["global_sha256"]),
                best,
            )
        summary = {
            "status": status,
            "rounds_completed": len(rounds),
            "rounds_lost": len(lost_rounds(rounds)),
            "reason": reason,
            "rollbacks": sum(bool(r.get("guard", {}).get("rolled_back")) for r in rounds),
            "best": pick(best),
            "final": pick(final),
            "best_checkpoint": str(self.best) if best is not None else None,
            "last_checkpoint": str(self.last),
            "total_seconds": sum(r.get("round_seconds", 0.0) for r in rounds),
            "clearml_task": clearml_task,  # the run's ClearML task (offline-… until imported)
        }
        write_json(self.summary, summary)
        return summary

    def write_plot(self, rounds: list[dict]) -> None:
        """metrics.png: global mAP per round and each client's training loss."""
        if not rounds:
            return
        matplotlib.use("Agg")  # before pyplot loads (its first use below)
        xs = [r["round"] for r in rounds]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for key, label in (("map50_95", "mAP50-95"), ("map50", "mAP50")):
            ax1.plot(xs, [r.get(key) for r in rounds], marker="o", label=label)
        ax1.set(xlabel="round", ylabel="held-out mAP", title="Global model (server val set)")
        ax1.grid(alpha=0.3)
        ax1.legend()
        clients = sorted({c["id"] for r in rounds for c in r.get("clients", [])})
        for cid in clients:
            pts = [
                (r["round"], c.get("loss"))
                for r in rounds
                for c in r.get("clients", [])
                if c["id"] == cid
            ]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"client {cid}")
        ax2.set(xlabel="round", ylabel="train loss (box+cls+dfl)", title="Client training loss")
        ax2.grid(alpha=0.3)
        if clients:
            ax2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.plot, dpi=110)
        plt.close(fig)

    def write_summary_md(
        self, summary: dict, rounds: list[dict], title: str, extra: str | None = None
    ) -> None:
        lines = [
            f"# {title}",
            "",
            f"Status: **{summary['status']}**, "
            f"{summary['rounds_completed']} rounds in {summary['total_seconds']:.0f} s.",
            "",
        ]
        if summary["best"]:
            b, f = summary["best"], summary["final"]
            lines.append(
                f"- Best: round {b['round']}, mAP50-95 {b['map50_95']:.3f}, mAP50 {b['map50']:.3f}"
                f" → `best.pt`"
            )
            if f:  # None when the run ended before its first round finished
                lines.append(
                    f"- Final: round {f['round']}, mAP50-95 {f['map50_95']:.3f}, "
                    f"mAP50 {f['map50']:.3f} → `last.pt`"
                )
            lines += [
                "",
                "All metrics are on the server's held-out validation set (no client trains on it).",
                "",
                "| round | mAP50-95 | mAP50 | precision | recall | seconds | clients | guard |",
                "|---:|---:|---:|---:|---:|---:|---:|---|",
            ]
            for r in rounds:
                guard = r.get("guard", {})
                guard = (
                    "rolled back"
                    if guard.get("rolled_back")
                    else "on probation"
                    if guard.get("probation")
                    else ""
                )
                lines.append(
                    f"| {r['round']} | {r['map50_95']:.3f} | {r['map50']:.3f} | "
                    f"{r['precision']:.3f} | {r['recall']:.3f} | {r['round_seconds']:.1f} | "
                    f"{len(r.get('clients', []))} | {guard} |"
                )
        events = self.read_events()
        quiet = {EventKind.INITIAL_EVAL, EventKind.RUN_START, EventKind.RUN_END}
        notable = [e for e in events if e["kind"] not in quiet]
        if notable:
            lines += ["", f"{len(notable)} notable events (see `events.jsonl`):", ""]
            lines += [
                f"- round {e['round']}: {e['kind']} {e.get('reason', '')}".rstrip()
                for e in notable[:20]
            ]
        if extra:
            lines += ["", extra]
        lines += ["", "![metrics](metrics.png)", ""]
        self.summary_md.write_text("\n".join(lines))


class SummaryWriter:
    """A round hook (``fl_server.hooks``): ``summary.json`` after every round, ``summary.md`` at
    the end, with the lines other hooks offer (``summary_line``, e.g. the ClearML task)."""

    def __init__(self, run: RunDir, others: list):
        self.run, self.others = run, others

    def on_round(self, record: dict) -> None:
        self.run.write_summary(self.run.rounds(), status=Status.RUNNING)

    def on_end(self, summary: dict) -> None:
        lines = [getattr(h, "summary_line", None) for h in self.others]
        extra = " ".join(x for x in lines if x) or None
        run = self.run
        run.write_summary_md(
            summary, run.rounds(), title=f"fedyolo run {run.path.name}", extra=extra
        )
