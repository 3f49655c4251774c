"""Paired bootstraps over the held-out images: is a drop (or a client's gain) beyond the noise?

Every model is scored on the same resampled images (``fl_server.guard.matches._map``), so two
models' difference is measured image set by image set: ``paired_drop`` for the rule's
significance test, ``joint_gains`` for every leave-one-out aggregate at once.
"""

from __future__ import annotations

import time

import numpy as np

from fl_server.guard.matches import _map


def paired_drop(
    reference: dict, candidate: dict, metric: str, resamples: int, alpha: float, seed: int
) -> dict | None:
    """Bootstrap of ``metric(reference) - metric(candidate)`` over the held-out images, paired
    (both models on the same resampled images): its ``alpha`` and ``1 - alpha`` quantiles.
    None when the two were not evaluated on the same images in the same order."""
    if reference["names"] != candidate["names"] or not reference["names"]:
        return None
    t0 = time.perf_counter()
    n = len(reference["names"])
    rng = np.random.default_rng(seed)
    diffs = np.array(
        [
            _map(reference, idx, metric) - _map(candidate, idx, metric)
            for idx in rng.integers(0, n, (resamples, n))
        ]
    )
    return _interval(diffs, alpha, n, time.perf_counter() - t0)


def joint_gains(
    everyone: dict, without: list[dict], metric: str, resamples: int, seed: int
) -> tuple[np.ndarray, float] | None:
    """Bootstrap of ``metric(without[j]) - metric(everyone)`` for every j on the same resampled
    held-out images: a (resamples, len(without)) array, and the seconds it took. None when the
    models were not evaluated on the same images in the same order."""
    names = everyone["names"]
    if not names or any(w["names"] != names for w in without):
        return None
    t0 = time.perf_counter()
    n = len(names)
    rng = np.random.default_rng(seed)
    rows = []
    for idx in rng.integers(0, n, (resamples, n)):
        base = _map(everyone, idx, metric)
        rows.append([_map(w, idx, metric) - base for w in without])
    return np.array(rows), time.perf_counter() - t0


def _interval(samples: np.ndarray, alpha: float, images: int, seconds: float) -> dict:
    """The ``alpha`` and ``1 - alpha`` quantiles of bootstrap ``samples``, with how they were
    obtained (what ``metrics.jsonl`` records as the evidence)."""
    return {
        "low": float(np.quantile(samples, alpha)),
        "high": float(np.quantile(samples, 1 - alpha)),
        "level": 1 - alpha,
        "resamples": len(samples),
        "images": images,
        "seconds": seconds,
    }
