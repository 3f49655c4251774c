"""The global model's way down (``transport.down=q4z``): every client that follows the steps
holds exactly the server's broadcast model; the broadcast model tracks the global one (error
feedback); a client that cannot apply the steps is refused loudly and then sent the model whole.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from fl_client.transport import WEIGHTS_KEY, digest, receive
from fl_server.downlink import Downlink

N = 50_003


def _globals(rounds: int, seed: int = 0):
    """A global model and its successors, each one round's aggregate update further."""
    rng = np.random.default_rng(seed)
    g = rng.normal(0, 0.1, N).astype(np.float32)
    out = [g]
    for _ in range(rounds):
        g = g + rng.laplace(0, 1e-3, N).astype(np.float32)
        out.append(g)
    return out


def _deliver(down: Downlink, nodes, held):
    records = down.records(nodes)
    for node in nodes:
        held[node], _ = receive(records[node], held.get(node))
        down.answered(node)
    return records


def test_clients_hold_the_servers_model_exactly_and_it_tracks_the_global_one():
    down, held = Downlink(block=256, window=3), {}
    models = _globals(12)
    step = None
    for r, g in enumerate(models):
        b = down.advance(g)
        nodes = [1, 2] if r % 3 == 0 else [1]  # node 2 misses two rounds of three
        if r == 10:
            nodes = [1, 3]  # node 3 joins late
        records = _deliver(down, nodes, held)
        for node in nodes:
            assert np.array_equal(held[node], b)  # bit for bit what the server holds
        if r == 1:
            step = records[1]
        # error feedback: the gap to the global model stays one step's quantization error
        assert np.abs(b - g).max() <= np.abs(models[r] - models[max(r - 1, 0)]).max() / 7
    full = 4 * N
    assert WEIGHTS_KEY not in step and 8 * step.count_bytes() < full  # a step: >= 8x fewer
    chain = down.records([2])[2]  # node 2 is 3 rounds behind: a chain, still smaller than whole
    assert WEIGHTS_KEY not in chain and chain.count_bytes() < full / 2
    _deliver(down, [3], held)
    now = down.records([3])[3]  # node 3 holds the model already (as after an evaluation)
    assert WEIGHTS_KEY not in now and now.count_bytes() < 1000  # no step: 3 headers


def test_beyond_the_window_a_restart_or_a_failure_bring_the_model_whole():
    down, held = Downlink(block=256, window=2), {}
    models = _globals(5)
    down.advance(models[0])
    _deliver(down, [1, 2], held)
    for g in models[1:4]:
        down.advance(g)
        _deliver(down, [1], held)
    # node 2 missed 3 steps, 2 kept: the whole model
    rec = down.records([2])[2]
    assert WEIGHTS_KEY in rec
    held[2], _ = receive(rec, held[2])
    down.answered(2)
    assert np.array_equal(held[2], down.model)

    down.advance(models[4])
    rec = down.records([1])[1]
    with pytest.raises(ValueError, match="does not hold the model"):
        receive(rec, None)  # restarted: holds nothing
    down.failed(1)
    assert WEIGHTS_KEY in down.records([1])[1]

    down.reset()  # a rollback: everyone gets the model whole
    down.advance(models[0])
    assert np.array_equal(down.model, models[0])
    assert WEIGHTS_KEY in down.records([2])[2]


def test_a_tampered_or_misapplied_step_is_refused():
    down, held = Downlink(block=256), {}
    models = _globals(2)
    down.advance(models[0])
    _deliver(down, [1], held)
    down.advance(models[1])
    rec = down.records([1])[1]
    scales = rec["scales-0"].numpy().copy()
    scales[0] *= 2
    rec["scales-0"] = Array(scales)
    with pytest.raises(ValueError, match="differs from the server's"):
        receive(rec, held[1])
    other = held[1].copy()
    other[0] += 1
    with pytest.raises(ValueError, match="does not hold"):
        receive(down.records([1])[1], other)
    assert digest(held[1]).size == 16
