"""Which partition a node answers for: a reply's ``partition-id`` is a claim, not a fact.

The SuperLink authenticates nodes, not their partitions, so the grid (``fl_server.observed_grid``)
binds each node on trust on first use: a node is bound to the partition it first claimed alone.
Afterwards a node claiming another partition, or a partition bound to another connected node, is
rejected (``update_rejected`` naming the claimed and the bound partition) and the honest node's
reply is untouched. Unbound nodes claiming one partition in the same round are all rejected and
none is bound: which of them is honest cannot be told. A partition whose node disconnected moves
to the node that claims it next (``partition_rebound``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import Message

from fl_client.wire import PARTITION_ID, ClientFailure, whole
from fl_server.records import EventKind
from fl_server.run_dir import RunDir

LOGGER = logging.getLogger(__name__)


class PartitionBinding:
    """The nodes bound to partitions (both ways), and the check of a round's claims."""

    def __init__(self, run: RunDir, connected: Callable[[], Iterable[int]]):
        self._run = run
        self._connected = connected  # the grid's connected nodes, asked only when needed
        self.bound: dict[int, int] = {}  # node → the partition it is bound to
        self.owner: dict[int, int] = {}  # partition → the node bound to it

    def client(self, node: int) -> int | str:
        """The client id a node's events and entries carry: its partition once bound."""
        return self.bound.get(node, f"node-{node}")

    def check(self, by_node: list[tuple[int, Message]], rnd: int) -> dict[int, tuple[dict, str]]:
        """Bind nodes to the partitions they claim for the first time; return the nodes whose
        claim contradicts a binding (node → (event fields, reason)). See the module docstring."""
        rejected: dict[int, tuple[dict, str]] = {}
        connected: set[int] | None = None
        fresh: dict[int, list[int]] = {}  # unbound partition → the unbound nodes claiming it
        for node, reply in by_node:
            pid = claimed_partition(reply)
            if pid is None:
                continue
            bound = self.bound.get(node)
            owner = self.owner.get(pid)
            if bound is not None and bound != pid:
                rejected[node] = (
                    {"claimed_partition": pid, "bound_partition": bound},
                    f"node {node} claims partition-id {pid}, but it is bound to partition "
                    f"{bound}: its reply is not counted",
                )
            elif bound is None and owner is not None:
                if connected is None:
                    connected = set(self._connected())
                if owner in connected:
                    rejected[node] = (
                        {"claimed_partition": pid, "bound_node": owner},
                        f"node {node} claims partition-id {pid}, which is bound to node {owner} "
                        "(still connected): its reply is not counted",
                    )
                else:
                    fresh.setdefault(pid, []).append(node)
            elif bound is None:
                fresh.setdefault(pid, []).append(node)
        for pid, nodes in fresh.items():
            if len(nodes) > 1:
                for node in nodes:
                    rejected[node] = (
                        {"claimed_partition": pid, "claimed_by": nodes},
                        f"nodes {nodes} all claim partition-id {pid} for the first time: none "
                        "is bound and none of their replies is counted",
                    )
                continue
            self._bind(nodes[0], pid, rnd)
        return rejected

    def _bind(self, node: int, pid: int, rnd: int) -> None:
        """Bind ``node`` to ``pid``, taking it from a node that disconnected (an event)."""
        gone = self.owner.get(pid)
        if gone is not None:
            self.bound.pop(gone, None)
            reason = f"partition {pid} moved from node {gone} (disconnected) to node {node}"
            self._run.event(
                rnd, EventKind.PARTITION_REBOUND, client=pid, node_id=node, reason=reason
            )
            LOGGER.warning("round %d: %s", rnd, reason)
        self.bound[node] = pid
        self.owner[pid] = node


def claimed_partition(reply: Message) -> int | None:
    """The partition a reply says it answers for (an ordinary reply's ``partition-id`` metric
    or a structured failure's), None when it names none or not as a whole number >= 0."""
    try:
        if reply.has_error():
            return None
        failure = ClientFailure.from_reply(reply)
        if failure is not None:
            return failure.partition_id
        records = reply.content.metric_records
        metrics = next(iter(records.values())) if records else {}
        value = metrics.get(PARTITION_ID) if PARTITION_ID in metrics else None
        return None if value is None else whole(value, PARTITION_ID, 0)
    except Exception:  # noqa: BLE001 - a malformed reply is judged (and rejected) by the grid
        return None
