"""The global model's way down to the clients (``transport.down=q4z``), the server's side.

The server keeps **the broadcast model** B, the model every up-to-date client holds, and moves
it toward each new global model G by one compressed step: B' = B + q4z(G − B). What the step
loses stays in G − B' and goes out with the next step (error feedback on the way down), so B
tracks G. A client that holds B receives the step alone; one that missed rounds receives the
steps since the model it holds (the last ``window`` are kept, compressed); one that holds
nothing the server knows of (a new or restarted client, a failed reply, after a resume or a
rollback) receives B whole. Each record names the model it gives by its digest, so a client can
never train on a model that differs from the server's (``fl_client.transport.receive``).

Which model a node holds is what it was sent in its last exchange that it answered without
error; a failure of any kind forgets it, so the next message brings the whole model.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from flwr.app import Array, ArrayRecord

from fl_client.transport import chain_down, digest, full_down, quantize_z


class Downlink:
    def __init__(self, block: int, window: int = 8):
        self.block, self.window = block, window
        self.model: np.ndarray | None = None  # B
        self._digest = b""  # of B
        self._target = b""  # of the G that B was last moved toward
        # (digest of the model a step applies to, the step's arrays), oldest first
        self._steps: deque[tuple[bytes, dict[str, Array]]] = deque(maxlen=window)
        self.holds: dict[int, bytes] = {}  # node → digest of the model it holds
        self._sent: dict[int, bytes] = {}  # node → digest of the model its message brings

    def reset(self) -> None:
        """Forget B and what nodes hold: the next messages bring the new global model whole
        (after a rollback: a step back to an old model is large, not worth quantizing)."""
        self.model, self._digest, self._target = None, b"", b""
        self._steps.clear()
        self.holds.clear()

    def advance(self, global_model: np.ndarray) -> np.ndarray:
        """Move B toward ``global_model`` (once per distinct global model); returns B."""
        g = np.asarray(global_model, np.float32).reshape(-1)
        target = digest(g).tobytes()
        if target == self._target and self.model is not None:
            return self.model
        if self.model is None or self.model.size != g.size:
            self.model = g.copy()
            self._steps.clear()
            self.holds.clear()
        else:
            arrays, sent = quantize_z(g - self.model, self.block)
            self._steps.append((self._digest, arrays))
            self.model = self.model + sent
        self._digest, self._target = digest(self.model).tobytes(), target
        return self.model

    def records(self, nodes: list[int]) -> dict[int, ArrayRecord]:
        """Per node, the record that brings it B (one record per distinct starting point)."""
        assert self.model is not None, "advance() first"
        made: dict[bytes, ArrayRecord] = {}
        out = {}
        for node in nodes:
            held = self.holds.get(node, b"")
            if held not in made:
                made[held] = self._record_from(held)
            out[node] = made[held]
            self._sent[node] = self._digest
        return out

    def _record_from(self, held: bytes) -> ArrayRecord:
        assert self.model is not None
        befores = [before for before, _ in self._steps]
        if held == self._digest:
            first = len(befores)  # it holds B already (an evaluation brought it): no step
        elif held and held in befores:
            first = befores.index(held)
        else:
            return full_down(self.model)
        steps = [arrays for _, arrays in list(self._steps)[first:]]
        base = np.frombuffer(held, np.uint8)
        return chain_down(base, steps, self.model, self.block)

    def answered(self, node: int) -> None:
        """``node`` answered its message without error: it holds what the message brought."""
        if node in self._sent:
            self.holds[node] = self._sent.pop(node)

    def failed(self, node: int) -> None:
        self._sent.pop(node, None)
        self.holds.pop(node, None)


__all__ = ["Downlink"]
