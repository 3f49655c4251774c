"""Every registered strategy runs a real federated round (real ClientApp, real training)."""

from __future__ import annotations

import math

import pytest
from inprocess import run_inprocess

from fl_server.run_dir import read_jsonl
from strategies import REGISTRY


def _rounds(run):
    return read_jsonl(run.metrics)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_registered_strategy_runs_a_round(tmp_path, name):
    run, _ = run_inprocess(tmp_path, [f"strategy={name}"])
    (rnd,) = _rounds(run)
    assert len(rnd["clients"]) == 3, read_jsonl(run.events)
    assert math.isfinite(rnd["map50_95"])
    events = read_jsonl(run.events)
    assert not [e for e in events if e["kind"] in ("round_failed", "update_rejected")], events
    initial = next(e for e in events if e["kind"] == "initial_eval")["weights_sha256"]
    assert rnd["weights_sha256"] != initial  # the round changed the global model


@pytest.mark.parametrize(
    "dp",
    [
        "{kind: server-fixed, noise_multiplier: 0.01, clipping_norm: 50.0}",
        "{kind: server-adaptive, noise_multiplier: 0.01, initial_clipping_norm: 50.0}",
        "{kind: client-fixed, noise_multiplier: 0.01, clipping_norm: 50.0}",
        "{kind: client-adaptive, noise_multiplier: 0.01, initial_clipping_norm: 50.0}",
    ],
)
def test_each_dp_wrapper_runs_a_round(tmp_path, dp):
    """Flower's DP wrappers (client-side ones with Flower's clipping mods on the client)."""
    run, _ = run_inprocess(tmp_path, [f"strategy.dp={dp}"])
    (rnd,) = _rounds(run)
    assert len(rnd["clients"]) == 3, read_jsonl(run.events)
    assert math.isfinite(rnd["map50_95"])
    kinds = {e["kind"] for e in read_jsonl(run.events)}
    assert not kinds & {"round_failed", "update_rejected"}
