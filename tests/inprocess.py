"""A tiny federation in this process: the real ServerApp ``serve()`` and the real ClientApp.

``InProcessGrid`` is a Flower ``Grid`` that hands each message to fedyolo's ``ClientApp`` with a
per-node ``Context`` kept across rounds (as a SuperNode keeps it), so tests run every strategy,
transport and fault through the same code paths as both engines, minus process boundaries.
A ``tamper`` hook lets a test turn one client's reply into a bad one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from testkit import TINY_BASE, StubGrid

from fl_client.client_app import app as client_app
from fl_server.config import compose
from fl_server.prepare import prepare_run
from fl_server.run_dir import RunDir
from fl_server.server_app import serve

TINY = [*TINY_BASE, "federation.rounds=1", "data.synth.images=72"]


class InProcessGrid(StubGrid):
    def __init__(self, clients: int, tamper: dict[int, Callable[[Message], Message]] | None = None):
        self.contexts = {
            n: Context(
                run_id=1,
                node_id=n,
                node_config={"partition-id": n - 1},
                state=RecordDict(),
                run_config={},
            )
            for n in range(1, clients + 1)
        }
        self.tamper = tamper or {}
        self.node_ids = list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            try:
                reply = client_app(m, self.contexts[node])
            except Exception as e:  # as Flower does: the error travels back as a reply
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            if node in self.tamper and m.metadata.message_type == "train":
                reply = self.tamper[node](reply)
            replies.append(reply)
        return replies


def run_inprocess(
    tmp_path: Path, overrides: list[str], clients: int = 3, tamper=None
) -> tuple[RunDir, InProcessGrid]:
    """Prepare a tiny run with ``overrides`` and serve it over an ``InProcessGrid``."""
    cfg = compose(
        [
            *TINY,
            f"federation.clients={clients}",
            "name=t",
            f"output.dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path.parent / 'synth-cache'}",
            *overrides,
        ]
    )
    run = prepare_run(cfg)
    grid = InProcessGrid(clients, tamper)
    serve(grid, run.path)
    return run, grid
