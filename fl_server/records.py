"""What a run writes, as types: the round records of ``metrics.jsonl``, the event kinds of
``events.jsonl`` and the run statuses.

Before, 22 event kinds and 6 statuses were string literals spread over four packages, and the
reference page drifted from them. Here each is a member with what it means;
``RunDir.event`` accepts only an ``EventKind``, so a new kind cannot appear without a member
(and ``tests/docs/test_docs.py`` holds ``docs/reference/events.md``'s tables to these types).
Both are ``StrEnum``: a member *is* its string, so the JSON on disk and comparisons with the
strings users' scripts read stay as they were.

A round record is a ``RoundRecord`` (a ``TypedDict``: the JSON line is the dict itself, so
``metrics.jsonl`` reads exactly as before, and every reader of a record is typed against it),
each client's part a ``ClientEntry``; ``docs/reference/run-directory.md``'s tables are held to
both by ``tests/docs/test_docs.py``.

Only the standard library here: every package that writes an event imports this module. No
``from __future__ import annotations``: ``NotRequired`` must be evaluated for a TypedDict's
``__required_keys__`` to know the optional keys.
"""

from collections.abc import Mapping
from enum import StrEnum, unique
from typing import Any, NotRequired, TypedDict


class ClientEntry(TypedDict):
    """One client's reply in a round record (``clients``, and ``client_eval`` for evaluate
    replies). The server measures the first five; the others are the reply's metrics as the
    client sent them (``fl_client.wire``'s names, ``-`` → ``_``), and a plug-in ClientApp's
    own metrics appear the same way."""

    id: int | str  # its partition, or node-<id> for a node bound to none
    node_id: int
    num_examples: int
    bytes_down: int  # serialized Flower messages, as they go over the wire
    bytes_up: int
    update_norm: NotRequired[float]  # ‖Δ‖ over trained parameters (train replies)
    drift_score: NotRequired[float]  # data drift vs its first rounds (drift.enabled)
    drift_features: NotRequired[dict[str, float]]
    cls_agreement: NotRequired[float | None]  # guard.contribution's classification agreement
    loss: NotRequired[float]  # the train reply's metrics:
    loss_box: NotRequired[float]
    loss_cls: NotRequired[float]
    loss_dfl: NotRequired[float]
    loss_distill: NotRequired[float]  # distillation runs
    teacher_received: NotRequired[int]
    setup_seconds: NotRequired[float]
    train_seconds: NotRequired[float]
    batch_seconds: NotRequired[float]
    batches: NotRequired[int]
    kept_state: NotRequired[int]
    momentum_kept: NotRequired[int]  # train.keep_momentum runs
    faults_ignored: NotRequired[int]
    handler_seconds: NotRequired[float]
    startup_seconds: NotRequired[float]
    rss_mb: NotRequired[float]  # peak resident memory (MiB) of the process that did the work
    map50: NotRequired[float]  # the evaluate reply's metrics (client_eval)
    map50_95: NotRequired[float]
    precision: NotRequired[float]
    recall: NotRequired[float]


class RoundRecord(TypedDict):
    """``metrics.jsonl``'s line for one finished round (a round hook's ``on_round`` argument).

    ``aggregate_seconds`` and ``server_rss_mb`` came later: a run directory written before them
    (a resumed run's earlier rounds too) lacks them, so read those two with ``.get``."""

    round: int
    map50: float  # the round's aggregate on the held-out set
    map50_95: float
    precision: float
    recall: float
    per_class: dict[str, Any]  # class name → its metrics
    round_seconds: float
    eval_seconds: float
    contribution_seconds: float  # guard.contribution's extra evaluations
    transport_seconds: float  # the grid's exchanges of the round
    aggregate_seconds: float  # the strategy's aggregate_train (robust aggregators included)
    server_rss_mb: float  # the server process's resident memory (MiB) at the round's end
    clients: list[ClientEntry]  # the train replies that were aggregated
    failures: int  # replies failed or rejected (train and evaluate)
    weights_sha256: str  # the round's aggregate, the model evaluated
    global_sha256: str  # the global model after the guard
    guard: dict[str, Any]  # the guard's decision (fl_server.guard.rule.Decision)
    lr0: float  # the clients' learning rate this round (guard.policy=lower_lr)
    client_eval: NotRequired[list[ClientEntry]]  # federation.fraction_evaluate > 0


def round_record(
    rnd: int,
    evaluated: Mapping[str, Any],
    *,
    clients: list[ClientEntry],
    client_eval: list[ClientEntry],
    failures: int,
    transport_seconds: float,
    contribution_seconds: float,
    aggregate_seconds: float,
    server_rss_mb: float,
    guard: dict[str, Any],
    global_sha256: str,
    round_seconds: float,
    eval_seconds: float,
    lr0: float,
) -> RoundRecord:
    """A round's record: the evaluated model's metrics (``evaluated``: the server's evaluation),
    what the grid saw, the guard's decision, the global model after it, the timings."""
    record = RoundRecord(
        round=rnd,
        map50=evaluated["map50"],
        map50_95=evaluated["map50_95"],
        precision=evaluated["precision"],
        recall=evaluated["recall"],
        per_class=evaluated["per_class"],
        round_seconds=round_seconds,
        eval_seconds=eval_seconds,
        contribution_seconds=contribution_seconds,
        transport_seconds=transport_seconds,
        aggregate_seconds=aggregate_seconds,
        server_rss_mb=server_rss_mb,
        clients=clients,
        failures=failures,
        weights_sha256=evaluated["weights_sha256"],
        global_sha256=global_sha256,
        guard=guard,
        lr0=lr0,
    )
    if client_eval:
        record["client_eval"] = client_eval
    return record


@unique
class EventKind(StrEnum):
    """``events.jsonl``'s ``kind``: what happened (its details are the event's other keys)."""

    RUN_START = "run_start"
    """A fresh run starts."""
    INITIAL_EVAL = "initial_eval"
    """The initial model was evaluated on the held-out set (round 0)."""
    RESUME = "resume"
    """A run continues from its saved state (``resume=``, or the compose SuperLink restarted)."""
    CLIENTS_MISSING = "clients_missing"
    """Fewer clients connected than the round needs."""
    CLIENTS_EXCLUDED = "clients_excluded"
    """Clients sit out this round (``guard.policy=exclude``)."""
    CLIENT_FAILED = "client_failed"
    """A client raised, crashed, timed out or disconnected; the round goes on without it."""
    UPDATE_REJECTED = "update_rejected"
    """A reply failed a check and was dropped before aggregation."""
    PARTITION_REBOUND = "partition_rebound"
    """A node's claimed partition was bound to it, or its binding changed."""
    FAULTS_IGNORED = "faults_ignored"
    """A client was asked to act out an injected fault but its node does not opt in."""
    WEIGHT_CAPPED = "weight_capped"
    """A client's claimed ``num-examples`` was capped."""
    ROUND_FAILED = "round_failed"
    """No usable client update: the global model is unchanged."""
    DROP_WITHIN_NOISE = "drop_within_noise"
    """The guard's rule fired but the drop is within the held-out set's noise: accepted."""
    DROP_ON_PROBATION = "drop_on_probation"
    """A significant drop below ``guard.severe_drop``: accepted on probation."""
    ROLLBACK = "rollback"
    """The round was rejected: the global model went back to the best checkpoint."""
    ROUND_DISCARDED = "round_discarded"
    """A round's training, begun on the previous round's model while the server evaluated it
    (``federation.overlap_eval``), was thrown away (that model was rolled back, the guard
    changed what the round trains with, the run stopped, or its exchange failed); the round
    runs again."""
    CLIENT_FLAGGED = "client_flagged"
    """``guard.contribution``: a client's updates kept hurting the model."""
    GUARD_STOP = "guard_stop"
    """``guard.stop_after`` consecutive rollbacks stopped the run."""
    HOOK_STOP = "hook_stop"
    """A round hook or a caller's callback asked the run to stop."""
    DATA_DRIFT = "data_drift"
    """A client's data statistics moved away from its first rounds."""
    TRACKER_ERROR = "tracker_error"
    """A ClearML call failed, or its server was unreachable at start; training goes on."""
    STATE_SYNC_FAILED = "state_sync_failed"
    """The S3 state copy failed; the run goes on."""
    RUN_FAILED = "run_failed"
    """The run ended with an error (its reason and traceback)."""
    RUN_END = "run_end"
    """The last write of a run: the run directory is complete."""


@unique
class Status(StrEnum):
    """``summary.json``'s ``status``: where a run stands, or how it ended."""

    RUNNING = "running"
    """The run has started and not ended (written before the first round)."""
    COMPLETED = "completed"
    """Every round ran."""
    STOPPED = "stopped"
    """Stopped early: consecutive rollbacks (``guard.stop_after``) or a round hook asked."""
    PRUNED = "pruned"
    """A round hook (a tuning trial's pruner) stopped it after a round."""
    INTERRUPTED = "interrupted"
    """Ctrl-C or SIGTERM: the last finished round's state is kept for ``resume=``."""
    FAILED = "failed"
    """No round aggregated a client update, or an error ended the run (``reason`` says why)."""
