"""What a run writes, as types: the event kinds of ``events.jsonl`` and the run statuses.

Before, 22 event kinds and 6 statuses were string literals spread over four packages, and the
reference page drifted from them. Here each is a member with what it means;
``RunDir.event`` accepts only an ``EventKind``, so a new kind cannot appear without a member
(and ``tests/docs/test_docs.py`` holds ``docs/reference/events.md``'s tables to these types).
Both are ``StrEnum``: a member *is* its string, so the JSON on disk and comparisons with the
strings users' scripts read stay as they were.

Only the standard library here: every package that writes an event imports this module.
"""

from __future__ import annotations

from enum import StrEnum, unique


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
