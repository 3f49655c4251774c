"""Client-update transports: each decodes within its stated error, and error feedback loses
nothing over rounds (fl_client.transport's docstring states the bounds tested here)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array
from testkit import transport_spec

from fl_client.model import WEIGHTS_KEY
from fl_client.transport import SCHEMES, decode, encode

N = 10_007  # not a multiple of the block size: the padded tail must decode too


def _pair(seed=0):
    rng = np.random.default_rng(seed)
    received = rng.normal(0, 0.5, N).astype(np.float32)
    # updates of very different scale in different places, as across a detector's layers
    delta = (rng.normal(0, 1, N) * np.where(np.arange(N) < N // 2, 1e-4, 1e-2)).astype(np.float32)
    return received, received + delta, delta


def test_fp32_is_lossless_and_plain_flower_weights():
    received, trained, _ = _pair()
    record, residual = encode(trained, received, transport_spec("fp32"), None)
    assert list(record.keys()) == [WEIGHTS_KEY] and residual is None
    np.testing.assert_array_equal(decode(record, received), trained)


def test_fp16_within_float16_rounding():
    received, trained, delta = _pair()
    record, _ = encode(trained, received, transport_spec("fp16", error_feedback=False), None)
    err = np.abs((decode(record, received) - received) - delta)
    # float16 rounding, plus float32 rounding of received + delta (received is ~0.5: ulp 6e-8)
    assert (err <= 2.0**-11 * np.abs(delta) + 2e-7).all()


@pytest.mark.parametrize("scheme,levels", [("q8", 127), ("q4", 7), ("q4z", 7)])
@pytest.mark.parametrize("block", [64, 256])
def test_quantized_within_half_a_step_of_each_block(scheme, levels, block):
    received, trained, delta = _pair()
    spec = transport_spec(scheme, block=block, error_feedback=False)
    record, _ = encode(trained, received, spec, None)
    got = decode(record, received) - received
    pad = np.concatenate([delta, np.zeros((-N) % block, np.float32)]).reshape(-1, block)
    step = np.repeat(np.abs(pad).max(axis=1) / levels, block)[:N]
    # half a quantization step, plus float32 rounding of received + delta
    assert (np.abs(got - delta) <= step / 2 + 1e-6).all()
    per_value = (1 if scheme == "q8" else 0.5) + 4 / block
    padded = -(-N // block) * block
    assert record.count_bytes() < padded * per_value + 600  # + NumPy headers of 4 small arrays


def test_topk_sends_the_largest_values_and_bounds_the_rest():
    received, trained, delta = _pair()
    spec = transport_spec("topk", fraction=0.05, error_feedback=False)
    record, _ = encode(trained, received, spec, None)
    got = decode(record, received) - received
    sent = got != 0
    assert sent.sum() == round(0.05 * N)
    smallest_sent = np.abs(delta[sent]).min()
    assert (np.abs(delta[~sent]) <= smallest_sent).all()  # dropped: the smaller ones
    assert (np.abs(got[sent] - delta[sent]) <= 2.0**-11 * np.abs(delta[sent]) + 1e-6).all()


@pytest.mark.parametrize("scheme", ["q4", "topk"])
def test_error_feedback_delivers_the_sum_of_updates(scheme):
    """Over rounds, what arrives sums to what was meant minus only the last residual."""
    rng = np.random.default_rng(3)
    spec = transport_spec(scheme, fraction=0.05)
    w = np.zeros(N, np.float32)
    residual, meant, arrived = None, np.zeros(N), np.zeros(N)
    for _ in range(30):
        delta = rng.normal(0, 1e-3, N).astype(np.float32)
        record, residual = encode(w + delta, w, spec, residual)
        arrived += decode(record, w) - w
        meant += delta
    np.testing.assert_allclose(arrived + residual, meant, atol=1e-5)
    # without feedback the dropped part is simply gone
    lost = np.zeros(N)
    for _ in range(30):
        delta = rng.normal(0, 1e-3, N).astype(np.float32)
        record, _ = encode(
            w + delta, w, transport_spec(scheme, fraction=0.05, error_feedback=False), None
        )
        lost += delta - (decode(record, w) - w)
    assert np.linalg.norm(residual) < 0.5 * np.linalg.norm(lost)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "fp32"])
def test_malformed_records_raise_naming_the_problem(scheme):
    received, trained, _ = _pair()
    record, _ = encode(trained, received, transport_spec(scheme, fraction=0.1), None)
    with pytest.raises(ValueError, match="model has"):
        decode(record, received[:-1])
    key = next(k for k in record if k not in ("meta", "transport"))
    bad = record[key].numpy().copy()
    if bad.dtype.kind == "f":
        bad[0] = np.nan
        record[key] = Array(bad)
        with pytest.raises(ValueError, match="non-finite"):
            decode(record, received)
    else:
        record[key] = Array(bad.astype(np.float64))
        with pytest.raises(ValueError, match="dtype"):
            decode(record, received)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="transport.scheme='zip'"):
        transport_spec("zip")
    with pytest.raises(ValueError, match="fraction"):
        transport_spec("topk", fraction=0)


def test_q4z_decodes_as_q4_in_fewer_bytes_and_refuses_a_bomb():
    """q4z is q4's codes deflated: the same values arrive, in fewer bytes for an update whose
    values are mostly small next to their block's largest (as a detector's are)."""
    import zlib

    rng = np.random.default_rng(5)
    received = rng.normal(0, 0.5, N).astype(np.float32)
    trained = received + rng.laplace(0, 1e-3, N).astype(np.float32)
    got = {}
    for scheme in ("q4", "q4z"):
        record, _ = encode(trained, received, transport_spec(scheme), None)
        got[scheme] = (decode(record, received), record.count_bytes(), record)
    np.testing.assert_array_equal(got["q4z"][0], got["q4"][0])
    assert got["q4z"][1] < got["q4"][1]
    record = got["q4z"][2]
    codes = record["codes"].numpy()
    for bad, why in [
        (zlib.compress(bytes(10 * N)), "exactly"),  # inflates past the model's size
        (zlib.compress(bytes(N // 4)), "exactly"),  # too short
        (codes.tobytes()[:-3], "exactly"),  # cut
        (b"not a deflate stream", "corrupt"),
    ]:
        record["codes"] = Array(np.frombuffer(bad, np.uint8))
        with pytest.raises(ValueError, match=why):
            decode(record, received)
