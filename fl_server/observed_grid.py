"""A Grid wrapper that sees every message a strategy sends and receives.

Flower's strategies talk to clients only through ``Grid.send_and_receive``. Wrapping the grid
(instead of subclassing each strategy) gives every strategy, Flower's or a user's, the same
per-client bookkeeping and the same update hygiene:

* bytes down and up per client: the size of the serialized Flower message (``Message`` protobuf)
  as it goes over the wire, before gRPC framing;
* each reply's metrics, failures with their reason, clients that never answered;
* the client's transport (``fl_client.transport``) decoded back to float32 weights against the
  global model that client was sent, so strategies always see plain weights;
* the global model's way down (``transport.down``, ``fl_server.downlink``): a strategy's
  messages carry the model whole; the grid sends each node only the steps from the model it
  holds;
* replies dropped before aggregation, with the reason in ``events.jsonl``: wrong keys, dtypes or
  sizes, non-finite values (a NaN update must never reach the global model), or an update whose
  norm is not sane (``aggregation.max_update_ratio``, ``max_step_norm_x_median``,
  ``max_norm_x_median``). The rules are ``strategies.reply_rules`` (stage 1 of
  ``strategies.guarded``'s story of a bad update); the grid gathers a round's replies, calls
  them and records what they refuse;
* which partition a node answers for: a reply's ``partition-id`` is a claim, checked against
  the partition the node is bound to (``fl_server.partition_binding``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict
from flwr.serverapp import Grid

from fl_client.wire import (
    BATCHES,
    CONFIG,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TEACHER_KEY,
    WEIGHTS_KEY,
    ClientFailure,
    EvalReply,
    TrainReply,
    record_field,
)
from fl_server.downlink import Downlink
from fl_server.flower_adapter import wire_bytes
from fl_server.partition_binding import PartitionBinding
from fl_server.records import ClientEntry, EventKind
from fl_server.run_dir import RunDir
from fl_server.sampling import Sampler
from strategies.guarded import AggregationPolicy
from strategies.reply_rules import Update, decode_update, median_outliers, update_norm

LOGGER = logging.getLogger(__name__)

TRAIN = "train"
BATCHES_FIELD = record_field(BATCHES)  # a client's entry's local steps (the per-step rule)


@dataclass
class RoundLog:
    """What the grid saw in one round."""

    started: float = field(default_factory=time.perf_counter)
    clients: list[ClientEntry] = field(default_factory=list)  # the round record's ``clients``
    client_eval: list[ClientEntry] = field(default_factory=list)
    sent: int = 0
    failed: int = 0
    transport_seconds: float = 0.0
    # client id → its decoded weights, kept only when asked (the drift guard scores culprits)
    updates: dict[str, np.ndarray] = field(default_factory=dict)
    # client id → the data statistics its train reply carried (``ds-*`` metrics)
    data_stats: dict[str, dict] = field(default_factory=dict)


def _weights_key(content: RecordDict) -> str | None:
    """The key of the one model record a message carries (besides a teacher), or None."""
    keys = [k for k in content.array_records if k != TEACHER_KEY]
    return keys[0] if len(keys) == 1 else None


def _sent_weights(messages: list[Message]) -> dict[int, np.ndarray | None]:
    """Per destination node, the packed global vector its train message carries.

    None where a message is not in fedyolo's packed format (e.g. a plug-in strategy's own).
    Strategies usually send one shared content to every node: it is decoded once.
    """
    decoded: dict[int, np.ndarray | None] = {}
    out = {}
    for m in messages:
        records = {k: v for k, v in m.content.array_records.items() if k != TEACHER_KEY}
        record = next(iter(records.values())) if len(records) == 1 else None
        if id(record) not in decoded:
            ok = record is not None and list(record.keys()) == [WEIGHTS_KEY]
            decoded[id(record)] = record[WEIGHTS_KEY].numpy().reshape(-1) if ok else None
        out[m.metadata.dst_node_id] = decoded[id(record)]
    return out


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the server during a round: the round is abandoned, not failed."""


class ObservedGrid(Grid):
    """Delegates to a real Grid and records what crosses it, round by round."""

    def __init__(
        self,
        grid: Grid,
        run_dir: RunDir,
        policy: AggregationPolicy | None = None,
        params_mask: np.ndarray | None = None,
        starve_timeout: float | None = None,
        downlink: Downlink | None = None,
    ):
        self._grid = grid
        self.downlink = downlink
        self.sampler: Sampler | None = None  # federation.sampling other than Flower's uniform
        # Flower's sampling waits for nodes forever; with fewer than ``min_nodes`` connected
        # for ``starve_timeout`` seconds the run ends instead, with a reason (and can resume).
        self.policy = policy or AggregationPolicy()
        self.min_nodes, self.starve_timeout = self.policy.min_replies, starve_timeout
        # the update norm is over trained parameters: BatchNorm running statistics legitimately
        # move a lot on a client whose data differs
        self.params_mask = params_mask
        self._starving_since: float | None = None
        self._run = run_dir
        self.partitions = PartitionBinding(run_dir, grid.get_node_ids)
        self.rounds: dict[int, RoundLog] = {}
        self.excluded: set[str] = set()  # client ids left out of sampling (drift guard policy)
        self.keep_updates = False
        # set by an engine that turns Ctrl-C/SIGTERM into a clean stop: a threading.Event
        # (fl_server.simulation) or an interrupts.StopFile (the deployment engine)
        self.interrupt = None
        # distillation (fl_client.distill): the teacher's records, added to a node's train
        # message until that node has answered one carrying it; a node that fails gets it again
        self.teacher: dict[str, Any] | None = None
        self._has_teacher: set[int] = set()

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
        """Connected nodes, minus those of clients the drift guard excluded for now."""
        nodes = list(self._grid.get_node_ids())
        if self.excluded:
            nodes = [n for n in nodes if str(self.partitions.bound.get(n, "")) not in self.excluded]
        if len(nodes) >= self.min_nodes:
            self._starving_since = None
        elif self._starving_since is None:
            self._starving_since = time.monotonic()
        elif self.starve_timeout and time.monotonic() - self._starving_since > self.starve_timeout:
            raise RuntimeError(
                f"only {len(nodes)} usable client(s) connected for {self.starve_timeout:.0f} s "
                f"(aggregation.min_replies={self.min_nodes}; excluded: "
                f"{sorted(self.excluded) or 'none'}); resume the run when clients are back"
            )
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        if not messages:
            return []
        rnd = (
            int(messages[0].content.config_records[CONFIG].get(SERVER_ROUND, 0))
            if (CONFIG in messages[0].content.config_records)
            else 0
        )
        log = self.rounds.setdefault(rnd, RoundLog())
        is_train = messages[0].metadata.message_type == TRAIN
        if is_train:
            messages = self._resample(messages, rnd)
        carried = self._add_teacher(messages) if is_train else set()
        models = _sent_weights(messages) if is_train or self.downlink is not None else {}
        sent = dict(models) if is_train else {}
        sent.update(self._send_down(messages, models))
        sizes: dict[int, int] = {}  # shared contents are sized once
        down = {m.metadata.dst_node_id: wire_bytes(m, sizes) for m in messages}
        t0 = time.perf_counter()
        replies = self._exchange(messages, timeout)
        log.transport_seconds += time.perf_counter() - t0
        # The node a reply answers for: an error the SuperLink makes up for a dead node comes
        # from the SuperLink itself, so go by the message it replies to (ids set on push).
        sent_msgs = {m.metadata.dst_node_id: m for m in messages}
        dst_by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        dst_by_id.pop("", None)
        kept, good = [], []
        answered: set[int] = set()
        by_node = [
            (dst_by_id.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r)
            for r in replies
        ]
        impostors = self.partitions.check(by_node, rnd)
        for node, reply in by_node:
            answered.add(node)
            if node in impostors:
                claim, why = impostors[node]
                self._fail(log, rnd, EventKind.UPDATE_REJECTED, node, why, is_train, **claim)
                continue
            try:  # whatever a reply holds, it costs at most itself: never the round or the run
                taken, entry = self._take(reply, node, sent_msgs, sent, down, log, rnd, is_train)
            except Exception as e:  # noqa: BLE001 - a hostile or broken reply of any shape
                self._fail(log, rnd, EventKind.UPDATE_REJECTED, node, _one_line(e), is_train)
                continue
            if self.downlink is not None and taken is not None and not taken.has_error():
                self.downlink.answered(node)
            if taken is not None and entry is not None:
                good.append((taken, entry))
                if self.sampler is not None:
                    self.sampler.answered(node, entry["num_examples"])
                if node in carried:
                    self._has_teacher.add(node)
            elif taken is not None:
                kept.append(taken)
        for reply, entry in self._outliers(good, log, rnd):
            log.clients.append(entry)
            kept.append(reply)
        for node in sorted(set(down).difference(answered)):
            reason = f"no reply within the round timeout ({timeout} s)"
            self._fail(log, rnd, EventKind.CLIENT_FAILED, node, reason, is_train)
        if is_train:
            log.sent += len(messages)
        return kept

    def _add_teacher(self, messages: list[Message]) -> set[int]:
        """Put the teacher into the train messages of nodes that do not have it yet."""
        if not self.teacher:
            return set()
        carried = set()
        for m in messages:
            node = m.metadata.dst_node_id
            if node not in self._has_teacher:
                m.content = RecordDict({**dict(m.content.items()), **self.teacher})
                carried.add(node)
        return carried

    def _resample(self, messages: list[Message], rnd: int) -> list[Message]:
        """The same message to the clients ``federation.sampling`` chooses, as many as the
        strategy sampled (``fl_server.sampling``); the strategy's own where it sent per-node
        contents or the policy is Flower's."""
        if self.sampler is None or len({id(m.content) for m in messages}) != 1:
            return messages
        nodes = list(self.get_node_ids())
        chosen = self.sampler.choose(rnd, nodes, len(messages), self._client)
        if chosen is None:
            return messages
        first = messages[0].metadata
        return [
            Message(
                content=messages[0].content,
                dst_node_id=n,
                message_type=first.message_type,
                ttl=first.ttl,
                group_id=first.group_id,
            )
            for n in chosen
        ]

    def _send_down(
        self, messages: list[Message], models: dict[int, np.ndarray | None]
    ) -> dict[int, np.ndarray]:
        """With a downlink, put into each message the record that brings its node the global
        model from the one it holds; per node, the model it will hold (empty without one, or
        where the messages do not all carry the same packed model)."""
        if self.downlink is None:
            return {}
        carried = list(models.values())  # the packed model each message carries (decoded once)
        if not carried or any(v is None for v in carried) or len({id(v) for v in carried}) != 1:
            return {}
        model = self.downlink.advance(carried[0])
        records = self.downlink.records([m.metadata.dst_node_id for m in messages])
        contents: dict[tuple[int, int], RecordDict] = {}  # shared where they were shared
        for m in messages:
            key = _weights_key(m.content)
            record = records[m.metadata.dst_node_id]
            shared = (id(m.content), id(record))
            if shared not in contents:
                contents[shared] = RecordDict({**dict(m.content.items()), key: record})
            m.content = contents[shared]
        return {m.metadata.dst_node_id: model for m in messages}

    def _exchange(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Flower's push-then-pull exchange, abandoned within a second of an interrupt.

        Replies of an interrupted round are discarded: clients killed by the same Ctrl-C
        must not be recorded as failures that never happened.
        """
        if self.interrupt is None:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        ids = set(self._grid.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        while ids and (timeout is None or time.monotonic() < end):
            if self.interrupt.is_set():
                break
            got = list(self._grid.pull_messages(ids))
            replies += got
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if ids:
                self.interrupt.wait(0.1)
        if self.interrupt.is_set():
            raise Interrupted("interrupted (Ctrl-C or SIGTERM) during the round")
        return replies

    def _take(
        self,
        reply: Message,
        node: int,
        sent_msgs: dict[int, Message],
        sent: dict[int, np.ndarray | None],
        down: dict[int, int],
        log: RoundLog,
        rnd: int,
        is_train: bool,
    ) -> tuple[Message | None, ClientEntry | None]:
        """Check one reply: (reply, None) for the strategy as it is, (reply, entry) for a good
        train reply, (None, None) for nothing; raise ValueError (``WireError`` for a reply
        that breaks the contract) naming what is wrong."""
        failure = ClientFailure.from_reply(reply)
        if failure is not None:  # the ClientApp's structured failure (fl_client.wire)
            if node not in sent_msgs:  # nothing was sent to it: no reply to count
                self._fail(log, rnd, EventKind.CLIENT_FAILED, node, str(failure), is_train)
                return None, None
            reply = Message(Error(code=0, reason=str(failure)), reply_to=sent_msgs[node])
        if reply.has_error():
            self._fail(log, rnd, EventKind.CLIENT_FAILED, node, reply.error.reason, is_train)
            return reply, None  # strategies count failures themselves
        if node not in sent_msgs:
            raise ValueError("a reply from a node nothing was sent to this round")
        parsed = TrainReply.parse(reply) if is_train else EvalReply.parse(reply)
        if isinstance(parsed, TrainReply) and parsed.faults_ignored:
            reason = (
                f"ignored {parsed.faults_ignored} injected fault(s): its node config does not "
                "opt in (fault-injection=true); it trained honestly"
            )
            client = self._client(node)
            self._run.event(
                rnd, EventKind.FAULTS_IGNORED, client=client, node_id=node, reason=reason
            )
            LOGGER.warning("round %d: client %s %s", rnd, client, reason)
        entry = self._client_entry(node, parsed, down.get(node, 0), wire_bytes(reply))
        if not isinstance(parsed, TrainReply):
            log.client_eval.append(entry)
            return reply, None
        norm = self._decode(reply, sent.get(node))
        if parsed.data_stats:
            log.data_stats[str(entry["id"])] = dict(parsed.data_stats)
        if norm is not None:
            entry["update_norm"] = norm
        if self.keep_updates:  # the decoded weights (``_decode`` replaced them)
            rec = next(iter(reply.content.array_records.values()))
            if WEIGHTS_KEY in rec:
                log.updates[str(entry["id"])] = rec[WEIGHTS_KEY].numpy().reshape(-1)
        return reply, entry

    def _decode(self, reply: Message, sent: np.ndarray | None) -> float | None:
        """Decode the reply's transport in place (``strategies.reply_rules``); its update norm,
        None where it has none; raise ValueError naming what is wrong."""
        key, record = next(iter(reply.content.array_records.items()))
        weights = decode_update(record, sent)
        if weights is None or sent is None:
            return None
        reply.content[key] = ArrayRecord({WEIGHTS_KEY: Array(weights)})
        return update_norm(weights, sent, self.policy, self.params_mask)

    def _outliers(self, good: list, log: RoundLog, rnd: int) -> list:
        """Drop the replies whose update norm is far above the round's median (3+ replies;
        ``strategies.reply_rules.median_outliers``), each recorded as ``update_rejected``."""
        updates = [Update(e.get("update_norm"), e.get(BATCHES_FIELD)) for _, e in good]
        dropped = median_outliers(updates, self.policy)
        for i, reason in dropped:
            node = good[i][1]["node_id"]
            self._fail(log, rnd, EventKind.UPDATE_REJECTED, node, reason, True)
        gone = {i for i, _ in dropped}
        return [g for i, g in enumerate(good) if i not in gone]

    # -- helpers -----------------------------------------------------------------------------
    def _fail(
        self,
        log: RoundLog,
        rnd: int,
        kind: EventKind,
        node: int,
        reason: str,
        is_train: bool,
        **fields: Any,
    ) -> None:
        """Count, record in events.jsonl and log one client's failure in round ``rnd``."""
        log.failed += 1
        if is_train:  # it may have lost the teacher with its process: it gets it again
            self._has_teacher.discard(node)
        if self.downlink is not None:  # nor can it be trusted to hold the model it was sent
            self.downlink.failed(node)
        phase = "train" if is_train else "evaluate"
        client = self._client(node)
        self._run.event(
            rnd, kind, client=client, node_id=node, phase=phase, reason=reason, **fields
        )
        LOGGER.warning("round %d: %s %s (%s): %s", rnd, kind, client, phase, reason)

    def _client(self, node: int) -> int | str:
        return self.partitions.client(node)

    def _client_entry(
        self, node: int, reply: TrainReply | EvalReply, down: int, up: int
    ) -> ClientEntry:
        """The client's entry in the round record: its metrics as sent (``record_field``
        names), then what the server measured (set last: a client cannot overwrite it)."""
        num = {} if reply.num_examples is None else {NUM_EXAMPLES: reply.num_examples}
        entry: dict[str, Any] = {record_field(k): v for k, v in {**num, **reply.metrics}.items()}
        entry.update(
            id=self._client(node),
            node_id=node,
            num_examples=int(reply.num_examples or 0),
            bytes_down=down,
            bytes_up=up,
        )
        return cast(ClientEntry, entry)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
