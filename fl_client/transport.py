"""How a client's update travels to the server (``transport=``).

The server always sends the global model as float32 (``fl_client.model``'s packed vector); the
client replies with its trained weights in one of these schemes:

========  ==================================================================  ================
scheme    what goes up                                                        bytes per value
========  ==================================================================  ================
``fp32``  the trained weights, float32 (Flower's default wire format)         4
``fp16``  the update Δ = trained − received, float16                          2
``q8``    Δ quantized per block of ``block`` values to int8 + a float32 scale  1 + 4/block
``q4``    as ``q8`` with 4-bit codes, two per byte                             0.5 + 4/block
``topk``  the ``fraction`` largest |Δ| as int32 index + float16 value          6 × fraction
========  ==================================================================  ================

Every delta scheme uses **error feedback**: what the encoding lost this round (the residual) is
added to the next round's update before encoding, so nothing is lost for good, only delayed
(Seide et al. 2014; Stich et al. 2018, "Sparsified SGD with memory"). The client keeps the
residual in its Flower ``context.state``.

Stated error of one encoding, for a value x of the (residual-corrected) update:

* ``fp16``: |x − x̂| ≤ 2⁻¹¹·|x| (float16 rounding; updates are far inside float16's range);
* ``q8`` / ``q4``: |x − x̂| ≤ s/2 with s = max|block| / 127 (resp. / 7), plus float32 rounding;
* ``topk``: kept values as ``fp16``; a dropped value's error is itself, at most the smallest
  kept magnitude.

``decode`` is strict: a record with missing or extra keys, wrong dtypes or sizes, indices out of
range or non-finite values raises ``ValueError`` naming the problem, so a malformed reply is
dropped by the server rather than half-applied.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

# the record's keys and the spec are part of the round contract: defined in fl_client.wire (and
# importable from here as before)
from fl_client.wire import SCHEME_KEY, SCHEMES, WEIGHTS_KEY, TransportSpec

_CODES = {name: i for i, name in enumerate(SCHEMES)}


def _levels(scheme: str) -> int:
    return 127 if scheme == "q8" else 7


def _quantize(x: np.ndarray, scheme: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-block absmax quantization: (codes, float32 scales)."""
    n = x.size
    pad = (-n) % block
    xb = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(-1, block)
    levels = _levels(scheme)
    scales = (np.abs(xb).max(axis=1) / levels).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.clip(np.rint(xb / safe[:, None]), -levels, levels).astype(np.int8).reshape(-1)
    if scheme == "q4":  # two's-complement nibbles, two per byte
        u = (q.astype(np.int16) & 0xF).astype(np.uint8)
        q = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
    return q, scales


def _dequantize(codes: np.ndarray, scales: np.ndarray, scheme: str, block: int, n: int):
    if scheme == "q4":
        lo = (codes & 0xF).astype(np.int8)
        hi = (codes >> 4).astype(np.int8)
        q = np.empty(codes.size * 2, np.int8)
        q[0::2], q[1::2] = lo, hi
        q = np.where(q > 7, q - 16, q).astype(np.int8)
    else:
        q = codes.astype(np.int8)
    return (q.reshape(-1, block).astype(np.float32) * scales[:, None]).reshape(-1)[:n]


def encode(
    trained: np.ndarray, received: np.ndarray, spec: TransportSpec, residual: np.ndarray | None
) -> tuple[ArrayRecord, np.ndarray | None]:
    """The reply record for ``trained`` weights and the residual to carry to the next round."""
    trained = np.asarray(trained, np.float32).reshape(-1)
    if spec.scheme == "fp32":  # exactly Flower's plain record, so Flower's mods (DP) apply
        return ArrayRecord({WEIGHTS_KEY: Array(trained)}), None
    tag = {SCHEME_KEY: Array(np.array([_CODES[spec.scheme]], np.int8))}
    delta = trained - np.asarray(received, np.float32).reshape(-1)
    if spec.error_feedback and residual is not None and residual.shape == delta.shape:
        delta = delta + residual
    n = delta.size
    if spec.scheme == "fp16":
        arrays = {"delta": Array(delta.astype(np.float16))}
    elif spec.scheme in ("q8", "q4"):
        codes, scales = _quantize(delta, spec.scheme, spec.block)
        arrays = {"codes": Array(codes), "scales": Array(scales)}
    else:  # topk
        k = max(1, int(round(spec.fraction * n)))
        idx = np.argpartition(np.abs(delta), n - k)[n - k :].astype(np.int32)
        idx.sort()
        arrays = {"index": Array(idx), "values": Array(delta[idx].astype(np.float16))}
    meta = np.array([n, spec.block], np.int64)
    record = ArrayRecord({**arrays, "meta": Array(meta), **tag})
    sent = decode_delta(record)
    new_residual = (delta - sent).astype(np.float32) if spec.error_feedback else None
    return record, new_residual


def _expect(record: ArrayRecord, keys: set[str]) -> None:
    got = set(record.keys())
    if got != keys:
        raise ValueError(f"transport: expected arrays {sorted(keys)}, got {sorted(got)}")


def _array(record: ArrayRecord, key: str, dtype: type, size: int | None = None) -> np.ndarray:
    a = record[key].numpy()
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"transport: '{key}' has dtype {a.dtype}, expected {np.dtype(dtype)}")
    a = a.reshape(-1)
    if size is not None and a.size != size:
        raise ValueError(f"transport: '{key}' has {a.size} values, expected {size}")
    return a


def scheme_of(record: ArrayRecord) -> str:
    """The scheme a reply was encoded with (a record without tag is plain ``fp32``)."""
    if SCHEME_KEY not in record:
        return "fp32"
    code = _array(record, SCHEME_KEY, np.int8, 1)[0]
    if not 0 <= code < len(SCHEMES):
        raise ValueError(f"transport: unknown scheme code {code}")
    return SCHEMES[code]


def decode_delta(record: ArrayRecord, size: int | None = None) -> np.ndarray:
    """The float32 update carried by a delta-scheme record.

    ``size``: the number of values the model has; a record claiming another is refused before
    anything is allocated (a hostile header cannot make the server allocate terabytes).
    """
    scheme = scheme_of(record)
    if scheme == "fp32":
        raise ValueError("transport: an fp32 record carries weights, not an update")
    meta = _array(record, "meta", np.int64, 2)
    n, block = int(meta[0]), int(meta[1])
    if n < 0 or (size is not None and n != size):
        raise ValueError(f"transport: the update claims {n} values, the model has {size}")
    if scheme == "fp16":
        _expect(record, {"delta", "meta", SCHEME_KEY})
        out = _array(record, "delta", np.float16, n).astype(np.float32)
    elif scheme in ("q8", "q4"):
        _expect(record, {"codes", "scales", "meta", SCHEME_KEY})
        if block < 2 or block % 2:
            raise ValueError(f"transport: block size {block} is invalid")
        blocks = -(-n // block)
        scales = _array(record, "scales", np.float32, blocks)
        size = blocks * block // (2 if scheme == "q4" else 1)
        codes = _array(record, "codes", np.uint8 if scheme == "q4" else np.int8, size)
        if not np.isfinite(scales).all():
            raise ValueError("transport: non-finite quantization scales")
        out = _dequantize(codes, scales, scheme, block, n)
    else:
        _expect(record, {"index", "values", "meta", SCHEME_KEY})
        idx = _array(record, "index", np.int32)
        vals = _array(record, "values", np.float16, idx.size)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"transport: top-k index out of range [0, {n})")
        out = np.zeros(n, np.float32)
        out[idx] = vals.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError("transport: non-finite values (NaN/inf) in the update")
    return out


def decode(record: ArrayRecord, received: np.ndarray) -> np.ndarray:
    """The client's trained weights (float32 vector) from its reply record.

    ``received`` is the global vector the server sent that client this round.
    """
    received = np.asarray(received, np.float32).reshape(-1)
    scheme = scheme_of(record)
    if scheme == "fp32":
        _expect(record, {WEIGHTS_KEY})
        out = _array(record, WEIGHTS_KEY, np.float32, received.size)
        if not np.isfinite(out).all():
            raise ValueError("transport: non-finite values (NaN/inf) in the returned weights")
        return out
    delta = decode_delta(record, received.size)
    if delta.size != received.size:
        raise ValueError(
            f"transport: the update has {delta.size} values, the model has {received.size}"
        )
    return received + delta
