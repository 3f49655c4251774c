"""Guards, transports, local parts and plug-ins in a real (in-process) federation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from inprocess import run_inprocess

from fl_client.client_app import STATE_KEY
from fl_client.model import WEIGHTS_KEY, build_model, part_masks
from fl_server.run_dir import read_jsonl


def _set_arrays(transform):
    def tamper(reply):
        w = reply.content["arrays"][WEIGHTS_KEY].numpy()
        reply.content["arrays"] = transform(w)
        return reply

    return tamper


def test_nan_wrong_shape_and_huge_norm_are_dropped_and_the_round_completes(tmp_path):
    tamper = {
        1: _set_arrays(lambda w: ArrayRecord({WEIGHTS_KEY: Array(np.where(w > 0, np.nan, w))})),
        2: _set_arrays(lambda w: ArrayRecord({WEIGHTS_KEY: Array(w[:-7])})),
        3: _set_arrays(lambda w: ArrayRecord({WEIGHTS_KEY: Array(w * 10)})),
    }
    run, _ = run_inprocess(tmp_path, [], clients=4, tamper=tamper)
    (rnd,) = read_jsonl(run.metrics)
    assert [c["id"] for c in rnd["clients"]] == [3]  # partition 3 = node 4, the honest one
    assert np.isfinite(rnd["map50_95"])
    reasons = {
        e["client"]: e["reason"] for e in read_jsonl(run.events) if e["kind"] == "update_rejected"
    }
    assert "non-finite" in reasons[0]
    assert "expected" in reasons[1] and "values" in reasons[1]
    assert "max_update_ratio" in reasons[2]


def test_too_few_good_replies_fail_the_round_and_keep_the_global_model(tmp_path):
    nan = _set_arrays(lambda w: ArrayRecord({WEIGHTS_KEY: Array(w * np.nan)}))
    run, _ = run_inprocess(tmp_path, ["aggregation.min_replies=2"], clients=2, tamper={1: nan})
    (rnd,) = read_jsonl(run.metrics)
    events = read_jsonl(run.events)
    initial = next(e for e in events if e["kind"] == "initial_eval")
    assert rnd["weights_sha256"] == initial["weights_sha256"]  # unchanged
    failed = [e for e in events if e["kind"] == "round_failed"]
    assert failed and "min_replies=2" in failed[0]["reason"]


@pytest.mark.parametrize("transport", ["fp16", "q8", "topk"])
def test_compressed_transport_trains_and_counts_real_bytes(tmp_path, transport):
    run, grid = run_inprocess(
        tmp_path, [f"transport={transport}", "federation.rounds=2"], clients=2
    )
    rounds = read_jsonl(run.metrics)
    assert len(rounds) == 2
    expected = {"fp16": 1.9, "q8": 3.5, "topk": 4}[transport]  # fewer bytes up than down
    for r in rounds:
        assert len(r["clients"]) == 2
        for c in r["clients"]:
            assert c["bytes_down"] > expected * c["bytes_up"] > 0
    assert rounds[0]["weights_sha256"] != rounds[1]["weights_sha256"]
    for ctx in grid.contexts.values():  # error feedback: each client carries its residual
        residual = ctx.state[STATE_KEY]["residual"].numpy()
        assert residual.dtype == np.float32 and np.isfinite(residual).all()


def test_q4z_both_ways_sends_steps_down_and_every_client_holds_the_servers_model(tmp_path):
    """transport=q4z (down q4z too): round 1 brings the model whole, later rounds (and each
    client evaluation) only steps; each client holds exactly the server's broadcast model."""
    from fl_client.handlers import HELD
    from fl_client.transport import DOWN_KEY, digest

    run, grid = run_inprocess(
        tmp_path,
        ["transport=q4z", "federation.rounds=3", "federation.fraction_evaluate=1.0"],
        clients=2,
    )
    rounds = read_jsonl(run.metrics)
    assert [len(r["clients"]) for r in rounds] == [2, 2, 2]
    whole = rounds[0]["clients"][0]["bytes_down"]
    for r in rounds:
        for c in r["clients"]:
            assert c["bytes_up"] < whole / 4
            if r["round"] > 1:  # steps only: the evaluation after round 1 brought the model
                assert c["bytes_down"] < whole / 4
        assert all(c["bytes_down"] < whole / 4 for c in r["client_eval"])
    assert rounds[1]["weights_sha256"] != rounds[2]["weights_sha256"]
    named = {n: rec[DOWN_KEY].numpy().tobytes() for n, rec in grid.last_arrays.items()}
    assert len(set(named.values())) == 1  # one broadcast model
    for node, ctx in grid.contexts.items():  # each holds exactly the model the server named
        assert digest(ctx.state[STATE_KEY][HELD].numpy()).tobytes() == named[node]


def test_a_sampling_policy_picks_the_strategys_sample_size_and_its_history_is_resumable(
    tmp_path,
):
    """federation.sampling=recency: the strategy's 2 of 4 per round; a refused reply counts as a
    miss (the weight halves), a good one clears them; the history is in the resumable state.
    (That the policies prefer whom they say is fl_server/test_sampling.py's, over 200 rounds.)"""
    from fl_server import state

    nan = _set_arrays(lambda w: ArrayRecord({WEIGHTS_KEY: Array(w * np.nan)}))
    run, _ = run_inprocess(
        tmp_path,
        ["federation.fraction=0.5", "federation.sampling=recency", "federation.rounds=6"],
        clients=4,
        tamper={4: nan},
    )
    rounds = read_jsonl(run.metrics)
    events = read_jsonl(run.events)
    refused = [e for e in events if e["kind"] == "update_rejected"]
    assert all(
        len(r["clients"]) + n == 2 for r, n in zip(rounds, _failures(rounds, refused), strict=True)
    )
    assert {e["client"] for e in refused} == {3}
    history = state.load(run.state)["sampling"]
    assert history["misses"]["3"] == len(refused) >= 1  # never a good reply
    assert all(history["misses"][c] == 0 for c in ("0", "1", "2") if c in history["misses"])
    trained = {str(c["id"]) for r in rounds for c in r["clients"]} | {"3"}
    assert set(history["sampled"]) == trained


def _failures(rounds, failed):
    return [sum(e["round"] == r["round"] for e in failed) for r in rounds]


def test_fedbn_keeps_batchnorm_local_and_the_server_still_has_statistics(tmp_path):
    run, grid = run_inprocess(tmp_path, ["strategy=fedbn", "federation.rounds=2"], clients=2)
    names = __import__("json").loads(run.manifest.read_text())["data"]["names"]
    model = build_model("fedyolo-tiny.yaml", names)
    bn = part_masks(model)["bn"]
    own = [ctx.state[STATE_KEY]["local"].numpy() for ctx in grid.contexts.values()]
    assert all(o.size == bn.sum() for o in own)
    assert not np.allclose(own[0], own[1])  # each client's BatchNorm is its own
    import torch

    server = torch.load(run.last, weights_only=False)["model"]
    stats = [m.running_var for m in server.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert stats and all(torch.isfinite(v).all() and (v > 0).all() for v in stats)
    assert not all(torch.allclose(v, torch.ones_like(v)) for v in stats)  # not the init values


def test_personalize_overwrites_exactly_the_local_parts():
    from flwr.app import RecordDict

    from fl_client.client_app import _keep_own, _personalize
    from fl_client.model import to_record

    model = build_model("fedyolo-tiny.yaml", ["a", "b"])
    masks = part_masks(model)
    g = to_record(model)[WEIGHTS_KEY].numpy()
    state = RecordDict()  # the client's Flower context.state
    own = np.full(int(masks["head"].sum()), 7.0, np.float32)
    _keep_own(state, {"local": own})
    _personalize(model, _round_config(keep_local=("head",)), state)
    now = to_record(model)[WEIGHTS_KEY].numpy()
    assert (now[masks["head"]] == 7.0).all()
    np.testing.assert_array_equal(now[~masks["head"]], g[~masks["head"]])


def test_a_plugin_strategy_by_import_path_is_used(tmp_path):
    from plugin_example import DampedFedAvg

    from fl_server import plugins

    DampedFedAvg.calls.clear()
    with plugins.trusting(["plugin_example:DampedFedAvg"]):  # fedyolo run --trust-plugin ...
        run, _ = run_inprocess(
            tmp_path,
            [
                "strategy=custom",
                "strategy._target_=plugin_example.DampedFedAvg",
                "+strategy.damping=0.25",
            ],
            clients=2,
        )
    assert DampedFedAvg.calls == [(1, 0.25)]  # built from the config, and it aggregated
    (rnd,) = read_jsonl(run.metrics)
    assert len(rnd["clients"]) == 2


def _round_config(**changes):
    from fl_server.config import compose
    from fl_server.server_app import round_config

    return round_config(compose([]), ["car"], "/nowhere", {"nc": 1}).with_round(**changes)
