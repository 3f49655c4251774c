"""Stage 1's rules as pure functions (``strategies.reply_rules``): each drops what it should and
keeps an honest reply; every margin is built from the inputs (a limit and a fraction either
side of it), never from a magnitude measured on some machine."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from testkit import transport_spec

from fl_client.transport import encode
from fl_client.wire import WEIGHTS_KEY
from strategies import AggregationPolicy
from strategies.reply_rules import (
    Update,
    decode_update,
    median_outliers,
    median_rule,
    update_norm,
)

N = 512
SENT = np.linspace(-1, 1, N, dtype=np.float32)


def _record(values: np.ndarray) -> ArrayRecord:
    return ArrayRecord({WEIGHTS_KEY: Array(np.asarray(values, np.float32))})


def _with_norm(norm: float, seed: int = 0) -> np.ndarray:
    """SENT plus a random direction of exactly ``norm``."""
    d = np.random.default_rng(seed).normal(size=N)
    return (SENT + d / np.linalg.norm(d) * norm).astype(np.float32)


# -- decoding ---------------------------------------------------------------------------------
def test_decode_returns_the_weights_sent_back_and_of_a_compressed_transport():
    trained = _with_norm(0.1)
    assert np.array_equal(decode_update(_record(trained), SENT), trained)
    record, _ = encode(trained, SENT, transport_spec("fp16"), None)
    assert np.allclose(decode_update(record, SENT), trained, atol=1e-2)


@pytest.mark.parametrize(
    ("record", "words"),
    [
        (_record(SENT[:-1]), f"{N - 1} values, expected {N}"),
        (ArrayRecord({WEIGHTS_KEY: Array(SENT.astype(np.float64))}), "dtype float64"),
        (ArrayRecord({"w": Array(SENT)}), "expected arrays ['weights'], got ['w']"),
        (_record(np.where(np.arange(N) == 7, np.nan, SENT)), "non-finite"),
    ],
)
def test_decode_refuses_a_broken_reply_naming_what_is_wrong(record, words):
    with pytest.raises(ValueError) as e:
        decode_update(record, SENT)
    assert words in str(e.value)


def test_a_record_in_no_packed_format_is_only_checked_to_be_finite():
    own = ArrayRecord({"a": Array(np.ones(3, np.float32)), "b": Array(np.zeros(2, np.float32))})
    assert decode_update(own, None) is None  # kept as it is
    own["b"] = Array(np.array([0.0, np.inf], np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        decode_update(own, None)


# -- the norm against the global model ----------------------------------------------------------
def test_update_ratio_keeps_below_the_limit_and_drops_above_it():
    policy = AggregationPolicy(max_update_ratio=0.5)
    limit = 0.5 * float(np.linalg.norm(SENT))
    assert update_norm(_with_norm(0.99 * limit), SENT, policy) == pytest.approx(0.99 * limit)
    with pytest.raises(ValueError, match=r"limit aggregation.max_update_ratio=0.5"):
        update_norm(_with_norm(1.01 * limit), SENT, policy)
    # no limit: the norm is only measured
    assert update_norm(_with_norm(10 * limit), SENT, AggregationPolicy()) > limit


def test_the_norm_is_over_the_mask_only():
    """BatchNorm statistics (outside the mask) may move a lot: they are not counted."""
    mask = np.arange(N) < N // 2
    policy = AggregationPolicy(max_update_ratio=0.5)
    weights = SENT.copy()
    weights[~mask] += 100.0  # far above any limit, outside the trained parameters
    weights[0] += 0.01
    assert update_norm(weights, SENT, policy, mask) == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ValueError, match="max_update_ratio"):
        update_norm(weights, SENT, policy)


# -- the median rules -----------------------------------------------------------------------------
def _honest(steps: list[int], per_step: float = 0.1) -> list[Update]:
    """Updates whose norm grows with their local steps, at the same norm per step."""
    return [Update(per_step * s, s) for s in steps]


def test_per_step_rule_keeps_honest_skewed_shards_and_drops_a_scaled_update():
    k = 3.0
    updates = [*_honest([2, 4, 8, 64]), Update(0.1 * 8 * k * 1.1, 8)]  # k x 1.1 at 8 steps
    dropped = median_rule(updates, k, per_step=True)
    assert [i for i, _ in dropped] == [4]
    assert "norm per local step" in dropped[0][1]
    assert f"max_step_norm_x_median={k}" in dropped[0][1]
    just_below = [*_honest([2, 4, 8, 64]), Update(0.1 * 8 * k * 0.9, 8)]
    assert median_rule(just_below, k, per_step=True) == []


def test_raw_rule_drops_the_honest_big_shard_the_per_step_rule_keeps():
    """Why the per-step rule exists: the same honest fleet, judged by raw norms."""
    updates = _honest([2, 4, 8, 64])
    assert [i for i, _ in median_rule(updates, 3.0, per_step=False)] == [3]
    assert median_rule(updates, 3.0, per_step=True) == []


def test_a_reply_without_a_batch_count_counts_as_one_step():
    """Leaving the count out must not help: its whole norm is compared per step."""
    updates = [*_honest([8, 8, 8]), Update(0.1 * 8, None)]  # honest over 8, claims nothing
    dropped = median_rule(updates, 3.0, per_step=True)
    assert [i for i, _ in dropped] == [3] and "None batches" in dropped[0][1]


@pytest.mark.parametrize(
    "updates",
    [
        [Update(0.1, 1), Update(10.0, 1)],  # fewer than 3: no median
        [Update(0.1, 1), Update(0.1, 1), Update(10.0, 1), Update(None, 1)],  # one has no norm
        [Update(0.0, 1), Update(0.0, 1), Update(10.0, 1)],  # a zero median
    ],
)
def test_no_median_no_rule(updates):
    assert median_rule(updates, 3.0, per_step=True) == []
    assert median_rule(updates, 3.0, per_step=False) == []


def test_per_step_rule_is_off_when_no_client_reports_its_batches():
    updates = [Update(0.1), Update(0.1), Update(10.0)]  # a plug-in ClientApp's replies
    assert median_rule(updates, 3.0, per_step=True) == []
    assert [i for i, _ in median_rule(updates, 3.0, per_step=False)] == [2]


def test_no_limit_no_rule():
    updates = [*_honest([1, 1, 1]), Update(1000.0, 1)]
    assert median_rule(updates, None, per_step=True) == []
    assert median_outliers(updates, AggregationPolicy()) == []


def test_outliers_apply_the_per_step_rule_then_the_raw_rule_to_what_it_kept():
    """The raw rule's median is over the replies the per-step rule kept, and the reasons come
    in that order (per step first), with the indexes of the input."""
    k = 3.0
    scaled = Update(0.1 * k * 100, 1)  # k x 100 per step: the per-step rule drops it
    big = Update(0.1 * k * 1.2, 10)  # small per step; raw: k x 1.2 the median of the kept
    updates = [scaled, *_honest([1, 1]), big]
    policy = AggregationPolicy(max_step_norm_x_median=k, max_norm_x_median=k)
    dropped = median_outliers(updates, policy)
    assert [i for i, _ in dropped] == [0, 3]
    assert "max_step_norm_x_median" in dropped[0][1]
    assert "max_norm_x_median" in dropped[1][1] and "per local step" not in dropped[1][1]
    # over all four, the scaled update would have raised the median enough to keep ``big``
    assert [i for i, _ in median_rule(updates, k, per_step=False)] == [0]
