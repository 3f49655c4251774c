"""A tiny federation in this process: the real ServerApp ``serve()`` and the real ClientApp.

``InProcessGrid`` is a Flower ``Grid`` that hands each message to fedyolo's ``ClientApp`` with a
per-node ``Context`` kept across rounds (as a SuperNode keeps it), so tests run every strategy,
transport and fault through the same code paths as both engines, minus process boundaries.
A ``tamper`` hook lets a test turn one client's reply into a bad one; ``down`` nodes are
disconnected (gone from the node list, no reply to what was already sent to them); ``kill_at``
stops the server when round N's training starts, as a killed server would (``ServerKilled``).
Nodes opt in to fault injection (``fault-injection``), as the local engines' do when a run
injects faults; ``fault_injection=False`` makes nodes that ignore them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from testkit import TINY_BASE, StubGrid

from fl_client.client_app import app as client_app
from fl_client.model import record_digest
from fl_server.config import compose, to_yaml
from fl_server.federation import Evaluator
from fl_server.prepare import prepare_run
from fl_server.run_dir import RunDir
from fl_server.server_app import serve

TINY = [*TINY_BASE, "federation.rounds=1", "data.synth.images=72"]

# In-process clients share the server's process, so its global random generators: the server's
# evaluation, overlapped with the next round's training (federation.overlap_eval), draws from
# torch's (Ultralytics' Conv-BN fusion initialises the fused layers) and would shift a client's
# augmentations mid-training. On the engines a client is a process of its own. Here a client's
# work and an evaluation each hold this lock, so in-process runs stay reproducible bit for bit;
# the overlap's logic (what runs when, what is kept or discarded) is unchanged.
RNG_LOCK = threading.RLock()
_evaluate = Evaluator.__call__


def _evaluate_locked(self, *args, **kwargs):
    with RNG_LOCK:
        return _evaluate(self, *args, **kwargs)


Evaluator.__call__ = _evaluate_locked


class ServerKilled(BaseException):
    """Raised into the server's round loop: what a kill -9 would cut short (not an Exception,
    so nothing in fedyolo handles it)."""


class InProcessGrid(StubGrid):
    def __init__(
        self,
        clients: int,
        tamper: dict[int, Callable[[Message], Message]] | None = None,
        kill_at: int | None = None,
        fault_injection: bool = True,
    ):
        self.contexts = {
            n: Context(
                run_id=1,
                node_id=n,
                node_config={"partition-id": n - 1, "fault-injection": fault_injection},
                state=RecordDict(),
                run_config={},
            )
            for n in range(1, clients + 1)
        }
        self.tamper = tamper or {}
        self.kill_at = kill_at
        self.down: set[int] = set()
        self.node_ids = list(self.contexts)
        self.on_round: Callable[[int, InProcessGrid], None] | None = None  # test hook
        self.received: dict[int, dict[int, str]] = {}  # round → node → digest of the weights sent
        self.last_arrays: dict[int, ArrayRecord] = {}  # node → the model record it was sent last

    def get_node_ids(self):
        return [n for n in self.node_ids if n not in self.down]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        messages = list(messages)
        self.last_arrays.update({m.metadata.dst_node_id: m.content["arrays"] for m in messages})
        if messages and messages[0].metadata.message_type == "train":
            rnd = int(messages[0].content["config"]["server-round"])
            if rnd == self.kill_at:
                raise ServerKilled(f"server killed at the start of round {rnd}")
            if self.on_round:
                self.on_round(rnd, self)
            self.received[rnd] = {
                m.metadata.dst_node_id: record_digest(m.content["arrays"]) for m in messages
            }
        for m in messages:
            node = m.metadata.dst_node_id
            if node in self.down:
                continue  # disconnected: no reply (the server's timeout path)
            try:
                with RNG_LOCK:
                    reply = client_app(m, self.contexts[node])
            except Exception as e:  # as Flower does: the error travels back as a reply
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            if node in self.tamper and m.metadata.message_type == "train":
                reply = self.tamper[node](reply)
            replies.append(reply)
        return replies


def tiny_config(tmp_path: Path, overrides: list[str], clients: int = 3, name: str = "t"):
    return compose(
        [
            *TINY,
            f"federation.clients={clients}",
            f"name={name}",
            f"output.dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path.parent / 'synth-cache'}",
            "tracking.enabled=false",
            *overrides,
        ]
    )


def run_inprocess(
    tmp_path: Path,
    overrides: list[str],
    clients: int = 3,
    tamper=None,
    grid: InProcessGrid | None = None,
    name: str = "t",
) -> tuple[RunDir, InProcessGrid]:
    """Prepare a tiny run with ``overrides`` and serve it over an ``InProcessGrid``.

    ClearML tracking is off unless a test turns it on (``tracking.enabled=true``).
    """
    run = prepare_run(tiny_config(tmp_path, overrides, clients, name))
    grid = grid or InProcessGrid(clients, tamper)
    serve(grid, run.path)
    return run, grid


def resume_inprocess(run: RunDir, grid: InProcessGrid, overrides: list[str] = ()) -> None:
    """``fedyolo run resume=<run>``, in this process."""
    cfg = compose([f"resume={run.path}", *overrides])
    run.config.write_text(to_yaml(cfg))
    serve(grid, run.path)
