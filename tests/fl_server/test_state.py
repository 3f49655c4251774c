"""The resumable state holds data only: round trip, and files it must refuse without running."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAdam,
    FedAvg,
)

from fl_server import state
from fl_server.config import ConfigError, compose


def _state(strategy) -> dict:
    w = np.arange(6, dtype=np.float32)
    return {
        "round": 3,
        "weights": w,
        "strategy": vars(strategy),
        "strategy_note": None,
        "best": (w * 2, state.strategy_state(strategy)),
        "guard": {"best_value": 0.5, "best_round": 2, "excluded": {"1": [3, 4]}},
        "drift": None,
        "tracker_task": None,
    }


def test_a_server_optimizer_and_a_dp_wrapper_come_back_exactly(tmp_path):
    adam = FedAdam(eta=0.1)
    adam.current_arrays = ArrayRecord({"w": Array(np.ones(4, np.float32))})
    adam.m_t = {"w": np.full(4, 0.25, np.float32)}
    adam.v_t = {"w": np.full(4, np.inf, np.float32)}
    adam.history = (1, 2.5, float("nan"), "x")
    path = tmp_path / state.FILENAME
    assert state.save(path, _state(adam)) == []
    loaded = state.load(path)
    fresh = FedAdam(eta=0.1)
    state.restore_strategy(fresh, loaded["strategy"])
    np.testing.assert_array_equal(fresh.m_t["w"], adam.m_t["w"])
    np.testing.assert_array_equal(fresh.v_t["w"], adam.v_t["w"])
    np.testing.assert_array_equal(fresh.current_arrays["w"].numpy(), np.ones(4))
    assert fresh.history[:2] == (1, 2.5) and np.isnan(fresh.history[2])
    assert fresh.train_metrics_aggr_fn is adam.train_metrics_aggr_fn  # code is rebuilt, not read
    np.testing.assert_array_equal(loaded["best"][0], np.arange(6) * 2)
    assert loaded["round"] == 3 and loaded["guard"]["excluded"] == {"1": [3, 4]}

    dp = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.1, num_sampled_clients=2
    )
    dp.clipping_norm = 0.37
    dp.strategy.current_arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    state.save(path, _state(dp))
    fresh_dp = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.1, num_sampled_clients=2
    )
    inner_before = fresh_dp.strategy
    state.restore_strategy(fresh_dp, state.load(path)["best"][1])
    assert fresh_dp.clipping_norm == 0.37 and fresh_dp.strategy is inner_before
    assert list(fresh_dp.strategy.current_arrays.keys()) == ["w"]


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_never_loaded(tmp_path):
    run = tmp_path / "victim"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    boom = _Boom()
    boom.marker = tmp_path / "pwned"
    (run / "server_state.pkl").write_bytes(pickle.dumps(boom))
    with pytest.raises(ConfigError, match="older fedyolo as a pickle"):
        compose([f"resume={run}"])
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", ["truncated", "foreign", "future"])
def test_a_bad_state_file_is_refused_in_one_line_and_nothing_is_touched(tmp_path, damage):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    path = run / state.FILENAME
    state.save(path, _state(FedAvg()))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "foreign":
        with path.open("wb") as f:
            np.savez(f, x=np.zeros(3))
    else:
        doc = state.load(path)
        state.FORMAT += 1
        try:
            state.save(path, doc)
        finally:
            state.FORMAT -= 1
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}
    with pytest.raises(ConfigError) as err:
        compose([f"resume={run}"])
    assert "\n" not in str(err.value) and state.FILENAME in str(err.value)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}
    assert after == before


def test_best_and_last_checkpoints_share_one_copy_and_stay_independent(tmp_path):
    from fl_server.federation import _replace

    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    best.write_bytes(b"round 3")
    _replace(best, last)  # the best round is also the last one: one copy on disk
    assert last.read_bytes() == b"round 3" and last.stat().st_ino == best.stat().st_ino
    (tmp_path / "candidate.pt").write_bytes(b"round 4")
    os.replace(tmp_path / "candidate.pt", last)  # how the next accepted round arrives
    assert best.read_bytes() == b"round 3" and last.read_bytes() == b"round 4"


def test_equal_arrays_are_stored_once_and_load_back_independent(tmp_path):
    w = np.random.default_rng(0).normal(size=200_000).astype(np.float32)  # 800 kB
    adam = FedAdam(eta=0.1)
    adam.current_arrays = ArrayRecord({"w": Array(w.copy())})  # the strategy's copy of it
    s = _state(adam) | {"weights": w, "best": (w.copy(), state.strategy_state(adam))}
    path = tmp_path / state.FILENAME
    state.save(path, s)
    assert path.stat().st_size < 1.2 * w.nbytes  # once, not four times
    loaded = state.load(path)
    np.testing.assert_array_equal(loaded["weights"], w)
    np.testing.assert_array_equal(loaded["best"][0], w)
    loaded["weights"][0] += 1.0  # each a copy of its own
    assert loaded["best"][0][0] == w[0]
