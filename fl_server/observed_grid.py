"""A Grid wrapper that sees every message a strategy sends and receives.

Flower's strategies talk to clients only through ``Grid.send_and_receive``. Wrapping the grid
(instead of subclassing each strategy) gives every strategy, Flower's or a user's, the same
per-client bookkeeping: bytes down and up, each reply's metrics, failures with their reason,
clients that never answered, and replies dropped before aggregation because their weights are
not finite (a NaN update must never reach the global model).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fl_client.model import record_is_finite
from fl_server.run_dir import RunDir

LOGGER = logging.getLogger(__name__)

TRAIN = "train"


@dataclass
class RoundLog:
    """What the grid saw in one round."""

    started: float = field(default_factory=time.perf_counter)
    clients: list[dict] = field(default_factory=list)
    client_eval: list[dict] = field(default_factory=list)
    sent: int = 0
    failed: int = 0
    transport_seconds: float = 0.0


def _payload_bytes(msg: Message) -> int:
    """Bytes of the arrays a message carries (Flower's ``ArrayRecord.count_bytes``)."""
    if msg.has_error():
        return 0
    return sum(rec.count_bytes() for rec in msg.content.array_records.values())


class ObservedGrid(Grid):
    """Delegates to a real Grid and records what crosses it, round by round."""

    def __init__(self, grid: Grid, run_dir: RunDir):
        self._grid = grid
        self._run = run_dir
        self._node_to_client: dict[int, int] = {}
        self.rounds: dict[int, RoundLog] = {}

    # -- the Grid interface, delegated -------------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # anything else a Grid offers (e.g. get_nodes)
        if name == "_grid":
            raise AttributeError(name)
        return getattr(self._grid, name)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        if not messages:
            return []
        rnd = (
            int(messages[0].content.config_records["config"].get("server-round", 0))
            if ("config" in messages[0].content.config_records)
            else 0
        )
        log = self.rounds.setdefault(rnd, RoundLog())
        is_train = messages[0].metadata.message_type == TRAIN
        down = {m.metadata.dst_node_id: _payload_bytes(m) for m in messages}
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        log.transport_seconds += time.perf_counter() - t0
        kept = []
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self._fail(log, rnd, "client_failed", node, reply.error.reason, is_train)
                kept.append(reply)  # strategies count failures themselves
                continue
            metrics = next(iter(reply.content.metric_records.values()), {})
            if "partition-id" in metrics:
                self._node_to_client[node] = int(metrics["partition-id"])
            if is_train and not all(
                record_is_finite(r) for r in reply.content.array_records.values()
            ):
                reason = "non-finite values (NaN/inf) in the returned weights"
                self._fail(log, rnd, "update_rejected", node, reason, is_train)
                continue
            entry = self._client_entry(node, metrics, down.get(node, 0), _payload_bytes(reply))
            (log.clients if is_train else log.client_eval).append(entry)
            kept.append(reply)
        for node in sorted(set(down).difference(answered)):
            reason = f"no reply within the round timeout ({timeout} s)"
            self._fail(log, rnd, "client_failed", node, reason, is_train)
        if is_train:
            log.sent += len(messages)
        return kept

    # -- helpers -----------------------------------------------------------------------------
    def _fail(
        self, log: RoundLog, rnd: int, kind: str, node: int, reason: str, is_train: bool
    ) -> None:
        """Count, record in events.jsonl and log one client's failure in round ``rnd``."""
        log.failed += 1
        phase = "train" if is_train else "evaluate"
        client = self._client(node)
        self._run.event(rnd, kind, client=client, node_id=node, phase=phase, reason=reason)
        LOGGER.warning("round %d: %s %s (%s): %s", rnd, kind, client, phase, reason)

    def _client(self, node: int) -> int | str:
        return self._node_to_client.get(node, f"node-{node}")

    def _client_entry(self, node: int, metrics: Any, down: int, up: int) -> dict:
        m = dict(metrics)
        entry = {
            "id": self._client(node),
            "node_id": node,
            "num_examples": int(m.pop("num-examples", 0)),
            "bytes_down": down,
            "bytes_up": up,
        }
        rename = {
            "train-seconds": "train_seconds",
            "setup-seconds": "setup_seconds",
            "batch-seconds": "batch_seconds",
            "handler-seconds": "handler_seconds",
            "startup-seconds": "startup_seconds",
        }
        for k, v in m.items():
            if k == "partition-id":
                continue
            entry[rename.get(k, k.replace("-", "_"))] = v
        return entry
