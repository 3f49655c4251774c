"""GuardedStrategy's guards around any strategy: min replies, weight caps, BatchNorm statistics."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg

from fl_client.model import WEIGHTS_KEY
from fl_server.run_dir import RunDir, read_jsonl
from strategies import AggregationPolicy, GuardedStrategy

N = 64
BN = np.zeros(N, bool)
BN[-16:] = True  # the last 16 values stand for BatchNorm running statistics


def _rec(v) -> ArrayRecord:
    return ArrayRecord({WEIGHTS_KEY: Array(np.asarray(v, np.float32))})


def _replies(values, counts):
    out = []
    for i, (v, n) in enumerate(zip(values, counts, strict=True)):
        sent = Message(
            RecordDict({"config": ConfigRecord({})}), dst_node_id=i + 1, message_type="train"
        )
        metrics = MetricRecord({"num-examples": n, "partition-id": i})
        out.append(Message(RecordDict({"arrays": _rec(v), "metrics": metrics}), reply_to=sent))
    return out


def _error_reply():
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=9, message_type="train")
    return Message(Error(code=0, reason="boom"), reply_to=sent)


def _agg(strategy, replies, rnd=1):
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return None if arrays is None else arrays[WEIGHTS_KEY].numpy()


def test_below_min_replies_the_round_fails_and_says_why(tmp_path):
    run = RunDir(tmp_path)
    s = GuardedStrategy(FedAvg(), AggregationPolicy(min_replies=2), run_dir=run)
    assert _agg(s, [*_replies([np.ones(N)], [10]), _error_reply()]) is None
    (event,) = read_jsonl(run.events)
    assert event["kind"] == "round_failed" and "1 good replies" in event["reason"]
    assert _agg(s, _replies([np.ones(N), np.ones(N)], [10, 10])) is not None


def test_a_huge_num_examples_claim_is_capped_and_recorded(tmp_path):
    run = RunDir(tmp_path)
    s = GuardedStrategy(FedAvg(), AggregationPolicy(clip_x_median=3), run_dir=run)
    values = [np.zeros(N), np.zeros(N), np.full(N, 10.0)]
    out = _agg(s, _replies(values, [100, 100, 1_000_000]))
    # capped at 3 x median = 300: the liar weighs 300/500, not ~100 %
    np.testing.assert_allclose(out, 10.0 * 300 / 500, rtol=1e-5)
    (event,) = read_jsonl(run.events)
    assert event["kind"] == "weight_capped" and event["claimed"] == 1_000_000
    assert event["used"] == 300 and event["client"] == 2
    s = GuardedStrategy(FedAvg(), AggregationPolicy(max_examples=50), run_dir=run)
    np.testing.assert_allclose(_agg(s, _replies(values, [100, 100, 1_000_000])), 10 / 3, rtol=1e-5)


def test_server_optimizer_keeps_state_and_bn_statistics_are_averaged():
    g = np.ones(N, np.float32)
    inner = FedAdam(eta=0.1)
    s = GuardedStrategy(inner, bn_stats_mask=BN)
    a, b = np.full(N, 0.5, np.float32), np.full(N, 2.0, np.float32)
    weights = []
    for rnd in (1, 2):
        inner.current_arrays = {WEIGHTS_KEY: g.copy()}  # what configure_train sets each round
        out = _agg(s, _replies([a, b], [30, 10]), rnd)
        weights.append(out)
        # statistics: the example-weighted mean of the clients' values, not an Adam step
        np.testing.assert_allclose(out[BN], 0.75 * 0.5 + 0.25 * 2.0, rtol=1e-6)
        # parameters: Adam's step on the pseudo-gradient, not the mean (0.875)
        assert np.all(np.abs(out[~BN] - 0.875) > 1e-3)
        g = out
    assert inner.m_t is not None and inner.v_t is not None  # the optimizer's state
    fresh = FedAdam(eta=0.1)
    fresh.current_arrays = {WEIGHTS_KEY: weights[0].copy()}
    stateless, _ = fresh.aggregate_train(2, _replies([a, b], [30, 10]))
    # round 2 with state differs from a fresh optimizer's first step
    assert not np.allclose(stateless[WEIGHTS_KEY].numpy()[~BN], weights[1][~BN])


def _bn_clients(counts=(300, 100, 50), shifts=(0.0, 3.0, -2.0), scales=(1.0, 0.5, 2.0)):
    """Clients whose BatchNorm statistics are their own data's mean and variance (8 channels)."""
    rng = np.random.default_rng(0)
    means, variances = np.zeros(N, bool), np.zeros(N, bool)
    means[-16:-8], variances[-8:] = True, True  # as fl_client.model.part_masks lays them out
    data = [
        rng.normal(shift, scale, (n, 8))
        for n, shift, scale in zip(counts, shifts, scales, strict=True)
    ]
    vecs = []
    for x in data:
        v = rng.normal(size=N).astype(np.float32)  # parameters: anything
        v[means], v[variances] = x.mean(0), x.var(0)
        vecs.append(v)
    return means, variances, data, vecs


def test_pooled_bn_variance_is_the_variance_of_the_clients_union():
    """bn_stats=pooled: each running variance becomes that of all clients' data together, not
    the mean of the clients' variances (which leaves out how far their means lie apart)."""
    counts = [300, 100, 50]
    means, variances, data, vecs = _bn_clients(counts)
    union = np.concatenate(data)
    pooled = GuardedStrategy(
        FedAvg(), bn_stats_mask=means | variances, bn_pooled=(means, variances)
    )
    out = _agg(pooled, _replies(vecs, counts))
    np.testing.assert_allclose(out[means], union.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[variances], union.var(0), rtol=1e-5)
    averaged = _agg(
        GuardedStrategy(FedAvg(), bn_stats_mask=means | variances), _replies(vecs, counts)
    )
    assert np.all(averaged[variances] < 0.5 * union.var(0))  # what plain averaging gets wrong
    np.testing.assert_allclose(out[~(means | variances)], averaged[~(means | variances)])


def test_the_guards_leave_one_out_pools_as_the_strategy_does():
    """With bn_stats=pooled, the guard's aggregate without a client (contributions, culprits)
    is the pooled strategy's aggregate of the others, in both of its ways (each mean summed, or
    one weighted sum with clients subtracted): leaving a client out changes the model by that
    client only, not by the pooling as well."""
    from fl_server.guard.step import WeightedSum, mean_without
    from fl_server.observed_grid import RoundLog

    counts = [300, 100, 50, 120]
    means, variances, _, vecs = _bn_clients(counts, (0.0, 3.0, -2.0, 1.0), (1.0, 0.5, 2.0, 1.5))
    pooled = (means, variances)
    log = RoundLog(
        clients=[{"id": i, "num_examples": n} for i, n in enumerate(counts)],
        updates={str(i): v for i, v in enumerate(vecs)},
    )
    strategy = GuardedStrategy(FedAvg(), bn_stats_mask=means | variances, bn_pooled=pooled)
    for excluded in (frozenset(), frozenset({"1"}), frozenset({"0", "3"})):
        kept = [i for i in range(len(counts)) if str(i) not in excluded]
        want = _agg(strategy, _replies([vecs[i] for i in kept], [counts[i] for i in kept]))
        for got in (mean_without(log, excluded, pooled), WeightedSum(log, pooled)(excluded)):
            np.testing.assert_allclose(got[WEIGHTS_KEY].numpy(), want, rtol=1e-5, atol=1e-5)
    plain = mean_without(log, frozenset({"1"}))[WEIGHTS_KEY].numpy()
    assert np.all(
        plain[variances]
        < mean_without(log, frozenset({"1"}), pooled)[WEIGHTS_KEY].numpy()[variances]
    )


def test_a_strategy_error_fails_the_round_instead_of_the_run(tmp_path):
    class Broken(FedAvg):
        def aggregate_train(self, server_round, replies):
            raise ValueError("Krum needs more clients")

    run = RunDir(tmp_path)
    s = GuardedStrategy(Broken(), run_dir=run)
    assert _agg(s, _replies([np.ones(N)], [1])) is None
    (event,) = read_jsonl(run.events)
    assert event["kind"] == "round_failed" and "Krum needs more clients" in event["reason"]
