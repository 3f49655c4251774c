"""How a client's update travels to the server (``transport=``).

The client replies with its trained weights (``fl_client.model``'s packed vector) in one of these
schemes:

========  ==================================================================  ================
scheme    what goes up                                                        bytes per value
========  ==================================================================  ================
``fp32``  the trained weights, float32 (Flower's default wire format)         4
``fp16``  the update Δ = trained − received, float16                          2
``q8``    Δ quantized per block of ``block`` values to int8 + a float32 scale  1 + 4/block
``q4``    as ``q8`` with 4-bit codes, two per byte                             0.5 + 4/block
``topk``  the ``fraction`` largest |Δ| as int32 index + float16 value          6 × fraction
``q4z``   ``q4``'s codes compressed losslessly (zlib's deflate)               ~0.3 + 4/block
========  ==================================================================  ================

``q4z``'s bytes depend on the update: deflate finds what the 4-bit codes do not use (most of an
update's values are small next to its block's largest, so their codes cluster around 0).

**The way down** (``transport.down``): ``fp32`` sends the global model as it is; ``q4z`` sends
what changed since the model the client holds, as ``q4z`` codes (``encode_down`` and ``receive``
here, the server's side in ``fl_server.downlink``).

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

import hashlib
import zlib

import numpy as np
from flwr.app import Array, ArrayRecord

# the record's keys and the spec are part of the round contract: defined in fl_client.wire (and
# importable from here as before)
from fl_client.wire import SCHEME_KEY, SCHEMES, WEIGHTS_KEY, TransportSpec

_CODES = {name: i for i, name in enumerate(SCHEMES)}


def _levels(scheme: str) -> int:
    return 127 if scheme == "q8" else 7


def _deflate(codes: np.ndarray) -> np.ndarray:
    return np.frombuffer(zlib.compress(codes.tobytes(), 6), np.uint8)


def _inflate(data: np.ndarray, size: int) -> np.ndarray:
    """Exactly ``size`` bytes out of deflated ``data``, or ValueError: a stream that would give
    more (a zip bomb) is cut at ``size`` and refused, never expanded in memory."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data.tobytes(), size)
    except zlib.error as e:
        raise ValueError(f"transport: compressed codes are corrupt ({e})") from e
    if len(out) != size or d.unconsumed_tail or not d.eof or d.unused_data:
        raise ValueError(f"transport: the compressed codes do not hold exactly {size} bytes")
    return np.frombuffer(out, np.uint8)


def _packed_size(n: int, block: int) -> tuple[int, int]:
    """(blocks, bytes of q4 codes) for ``n`` values."""
    blocks = -(-n // block)
    return blocks, blocks * block // 2


def quantize_z(x: np.ndarray, block: int) -> tuple[dict[str, Array], np.ndarray]:
    """``q4z``'s arrays for ``x`` and what they decode to (float32), exactly as a receiver
    decodes them."""
    codes, scales = _quantize(x, "q4", block)
    sent = _dequantize(codes, scales, "q4", block, x.size)
    return {"codes": Array(_deflate(codes)), "scales": Array(scales)}, sent


def _dequantize_z(record: ArrayRecord, n: int, block: int, suffix: str = "") -> np.ndarray:
    blocks, size = _packed_size(n, block)
    scales = _array(record, f"scales{suffix}", np.float32, blocks)
    if not np.isfinite(scales).all():
        raise ValueError("transport: non-finite quantization scales")
    codes = _inflate(_array(record, f"codes{suffix}", np.uint8), size)
    return _dequantize(codes, scales, "q4", block, n)


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
    elif spec.scheme == "q4z":
        arrays = quantize_z(delta, spec.block)[0]
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
    elif scheme in ("q8", "q4", "q4z"):
        _expect(record, {"codes", "scales", "meta", SCHEME_KEY})
        if block < 2 or block % 2:
            raise ValueError(f"transport: block size {block} is invalid")
        if scheme == "q4z":
            return _finite(_dequantize_z(record, n, block))
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
    return _finite(out)


def _finite(out: np.ndarray) -> np.ndarray:
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


# -- the way down (``transport.down``) -----------------------------------------------------------
DOWN_KEY = "down"  # uint8 digest of the model the record brings (its presence: "hold it")
BASE_KEY = "base"  # uint8 digest of the model a chain of steps applies to
MAX_STEPS = 64  # steps a chain may claim (the server keeps fewer): a hostile header stays cheap


def digest(vec: np.ndarray) -> np.ndarray:
    """16 bytes naming a packed float32 vector exactly (BLAKE2b)."""
    raw = np.ascontiguousarray(vec, np.float32).tobytes()
    return np.frombuffer(hashlib.blake2b(raw, digest_size=16).digest(), np.uint8)


def full_down(model: np.ndarray) -> ArrayRecord:
    """The whole model, to be held by the client as the base of the next steps."""
    return ArrayRecord({WEIGHTS_KEY: Array(model), DOWN_KEY: Array(digest(model))})


def chain_down(base: np.ndarray, steps: list[dict[str, Array]], result: np.ndarray, block: int):
    """The steps (``quantize_z`` arrays) that take a client holding ``base`` (its digest) to
    ``result`` (its digest)."""
    arrays = {f"{k}-{i}": a for i, step in enumerate(steps) for k, a in step.items()}
    meta = np.array([result.size, block, len(steps)], np.int64)
    return ArrayRecord(
        {**arrays, "meta": Array(meta), BASE_KEY: Array(base), DOWN_KEY: Array(digest(result))}
    )


def receive(record: ArrayRecord, held: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """The global model a message brings, and whether to hold it for the next steps.

    A chain applies to the model this client holds, named by its digest, and must give exactly
    the model the server named: anything else raises ValueError (the server then sends the
    whole model), never a model that differs from the server's.
    """
    if DOWN_KEY not in record:  # fp32 down: the model as it is
        return _array(record, WEIGHTS_KEY, np.float32), False
    want = _array(record, DOWN_KEY, np.uint8, 16)
    if WEIGHTS_KEY in record:
        _expect(record, {WEIGHTS_KEY, DOWN_KEY})
        model = _array(record, WEIGHTS_KEY, np.float32)
    else:
        meta = _array(record, "meta", np.int64, 3)
        n, block, count = (int(v) for v in meta)
        if not 0 <= count <= MAX_STEPS or block < 2 or block % 2:
            raise ValueError(f"transport.down: a chain of {count} steps, block {block}")
        steps = {f"{k}-{i}" for i in range(count) for k in ("codes", "scales")}
        _expect(record, {*steps, "meta", BASE_KEY, DOWN_KEY})
        base = _array(record, BASE_KEY, np.uint8, 16)
        if held is None or held.size != n or not np.array_equal(digest(held), base):
            raise ValueError(
                "transport.down: this client does not hold the model the server's steps apply "
                "to (restarted, or it missed more rounds than the server keeps); the server "
                "sends the whole model next time"
            )
        model = held.astype(np.float32, copy=True)
        for i in range(count):
            model += _dequantize_z(record, n, block, f"-{i}")
    if not np.array_equal(digest(model), want):
        raise ValueError("transport.down: the model received differs from the server's")
    return model, True
