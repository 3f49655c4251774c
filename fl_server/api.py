"""The library entry point: one federation from Python, as ``fedyolo run`` does it.

    from fl_server import run

    summary = run(["federation.clients=4", "federation.rounds=5"], callbacks=[my_callback])
    print(summary.status, summary.best.map50_95, summary.best_checkpoint)

``run`` composes and validates the config (a bad value raises ``ConfigError`` before any work),
prepares the run directory (or reopens it with ``resume=``), runs the engine named by
``engine.name`` (``fl_server.engines``) and returns the run's ``summary.json`` as a ``Summary``.
``callbacks`` are round hooks (``fl_server.hooks``) called in this process after every round,
in every engine; a callback can stop the run after that round with a status (``pruned``,
``stopped``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fl_server import config as config_mod
from fl_server import engines
from fl_server.hooks import STOP_STATUSES, Watcher, call_on_end
from fl_server.prepare import prepare_run
from fl_server.process_env import set_process_environment
from fl_server.records import Status
from fl_server.run_dir import RunDir

LOGGER = logging.getLogger("fedyolo")


@dataclass(frozen=True)
class RoundResult:
    """One round's global model on the server's held-out set."""

    round: int
    map50: float
    map50_95: float
    precision: float
    recall: float

    @classmethod
    def from_dict(cls, d: dict | None) -> RoundResult | None:
        if d is None:
            return None
        return cls(
            int(d["round"]),
            float(d["map50"]),
            float(d["map50_95"]),
            float(d["precision"]),
            float(d["recall"]),
        )


@dataclass(frozen=True)
class Summary:
    """``summary.json`` as a typed object, plus the run directory it describes."""

    run_dir: Path
    status: str  # completed | stopped | pruned | interrupted | failed | running
    rounds_completed: int
    rollbacks: int
    best: RoundResult | None
    final: RoundResult | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    total_seconds: float
    rounds_lost: int = 0  # finished rounds that aggregated no client update
    reason: str | None = None  # why the run failed, in one line
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def read(cls, run_dir: Path) -> Summary:
        d = json.loads(RunDir(Path(run_dir)).summary.read_text())
        return cls(
            run_dir=Path(run_dir),
            status=str(d["status"]),
            rounds_completed=int(d["rounds_completed"]),
            rollbacks=int(d.get("rollbacks", 0)),
            best=RoundResult.from_dict(d.get("best")),
            final=RoundResult.from_dict(d.get("final")),
            best_checkpoint=Path(d["best_checkpoint"]) if d.get("best_checkpoint") else None,
            last_checkpoint=Path(d["last_checkpoint"]) if d.get("last_checkpoint") else None,
            total_seconds=float(d.get("total_seconds", 0.0)),
            rounds_lost=int(d.get("rounds_lost") or 0),
            reason=d.get("reason"),
            raw=d,
        )

    @property
    def ok(self) -> bool:
        """The run ended as planned: completed, or stopped on purpose (guard, hook)."""
        return self.status == Status.COMPLETED or self.status in STOP_STATUSES


class _FunctionHook:
    """A plain function ``f(record) -> status | None`` as a round hook."""

    def __init__(self, f: Callable[[dict], str | None]):
        self.f = f

    def on_round(self, record: dict) -> str | None:
        return self.f(record)


def run(
    config: Sequence[str] | Any = (),
    *,
    callbacks: Sequence[Any] = (),
    callback_timeout: float = 600.0,
) -> Summary:
    """Run one federation; return its summary.

    ``config``: Hydra overrides (``["federation.clients=4", ...]``) or a config composed with
    ``fl_server.config.compose``. ``callbacks``: round hooks (objects with ``on_round(record)``
    and optionally ``on_end(summary)``, or plain functions of the record) run in this process;
    a hook that does not answer within ``callback_timeout`` seconds is skipped for that round.
    """
    set_process_environment()
    cfg = config if isinstance(config, DictConfig) else config_mod.compose(list(config))
    engine = engines.get(str(cfg.engine.name))
    with contextlib.ExitStack() as hold:  # the run is this process's until it ends
        if cfg.resume is not None:  # the run directory exists; its config gets the allowed changes
            rd = RunDir(Path(str(cfg.resume)))
            hold.enter_context(rd.held())
            with rd.held(RunDir.SERVER_LOCK, create=False):
                pass  # nor a server left running by a fedyolo process that was killed
            rd.config.write_text(config_mod.to_yaml(cfg))
        else:
            rd = prepare_run(cfg)
            hold.enter_context(rd.held())
        LOGGER.info(
            "%s: %s (engine=%s, %d clients, %d rounds)",
            "resuming" if cfg.resume is not None else "run directory",
            rd.path,
            cfg.engine.name,
            cfg.federation.clients,
            cfg.federation.rounds,
        )
        hooks = [h if hasattr(h, "on_round") else _FunctionHook(h) for h in callbacks]
        watcher = Watcher(rd.path, hooks, callback_timeout) if hooks else None
        if watcher is None:  # a caller killed earlier may have left its marker: nobody waits now
            Watcher.forget(rd.path)
        try:
            if watcher is None:
                engine(rd, cfg)
            else:
                with watcher:
                    engine(rd, cfg)
        except RuntimeError as e:  # the engine's own trouble (Flower, Ray): the run failed
            LOGGER.debug("the engine failed", exc_info=True)
            _unfinished(rd, f"the {cfg.engine.name} engine failed: {' '.join(str(e).split())}")
        _unfinished(
            rd, "the run ended without finishing summary.json (a full disk?); see events.jsonl"
        )
        summary = Summary.read(rd.path)
    if hooks:
        call_on_end(hooks, summary.raw)
    if watcher is not None and watcher.error is not None:
        raise watcher.error
    return summary


def _unfinished(rd: Any, reason: str) -> None:
    """A run whose summary.json is missing or still ``running`` after its engine ended failed:
    say so there, with ``reason`` (an OSError, e.g. a disk still full, reaches the caller)."""
    if rd.summary.exists() and Summary.read(rd.path).status != Status.RUNNING:
        return
    LOGGER.error("the run failed: %s", reason)
    rd.write_summary(rd.rounds(), status=Status.FAILED, reason=reason)


def distill(
    run_dir: str | Path,
    student: str,
    overrides: Sequence[str] = (),
    *,
    callbacks: Sequence[Any] = (),
) -> Summary:
    """Distil run ``run_dir``'s ``best.pt`` into a ``student`` (e.g. ``yolov8n.yaml``) trained
    federatedly on the same data, partition, seed and training settings (``fedyolo distill``).

    The new run is ``<run>-distill-<student>`` beside the teacher's (``name=`` overrides it).
    Raises ``ConfigError`` when the new run's data version is not the teacher's: its held-out
    set would not be the one the teacher was chosen on.
    """
    set_process_environment()
    run_dir = Path(run_dir).expanduser().resolve()
    best = RunDir(run_dir).best
    if not best.is_file():
        raise config_mod.ConfigError(f"distill: {run_dir} has no {best.name} (a finished run?)")
    stem = Path(student).stem
    cfg = config_mod.from_run(
        run_dir,
        [
            f"model.cfg={student}",
            f"distill.teacher={best}",
            f"name={run_dir.name}-distill-{stem}",
            f"output.dir={run_dir.parent}",
            "resume=null",
            "output.overwrite=false",
            *overrides,
        ],
    )
    summary = run(cfg, callbacks=callbacks)
    theirs = json.loads(RunDir(run_dir).manifest.read_text())["data"]["data_version"]
    ours = json.loads(RunDir(summary.run_dir).manifest.read_text())["data"]["data_version"]
    if theirs != ours:
        raise config_mod.ConfigError(
            f"distill: {summary.run_dir} trained on data version {ours[:12]}, the teacher's run "
            f"on {theirs[:12]}: its metrics are not comparable with the teacher's"
        )
    return summary
