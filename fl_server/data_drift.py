"""Per-client data drift: how far each client's data statistics moved from its first rounds.

Clients report cheap histograms of their data every round (``fl_client.data_stats``).
A client's first ``reference_rounds`` reports are averaged into its reference; later
reports are scored per feature with the Jensen-Shannon distance (base 2, so in
[0, 1]), and the round's score is the largest feature distance. A score above
``threshold`` means that client's world changed (new camera, night shift, fog, a
class gone), which usually shows before the global mAP drops.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fl_client.data_stats import HISTOGRAMS


def js_distance(p: Any, q: Any) -> float:
    """Jensen-Shannon distance (base 2) of two histograms, normalised here; in [0, 1].

    Two empty histograms are at distance 0; an empty and a non-empty one, or two of
    different lengths, at 1. Negative and non-finite entries count as empty bins.
    """
    p, q = _normalised(p), _normalised(q)
    if p.shape != q.shape or p.any() != q.any():
        return 1.0
    if not p.any():
        return 0.0
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.sqrt(np.clip((kl(p) + kl(q)) / 2, 0.0, 1.0)))


def _normalised(hist: Any) -> np.ndarray:
    """``hist`` as floats summing to 1 (all zeros if empty), bad entries zeroed."""
    h = np.asarray(hist, float).ravel()
    h = np.where(np.isfinite(h) & (h > 0), h, 0.0)
    return h / h.sum() if h.sum() > 0 else h


class DriftMonitor:
    """Scores each client's reported statistics against that client's own reference."""

    def __init__(self, reference_rounds: int, threshold: float) -> None:
        if reference_rounds < 1:
            raise ValueError(f"reference_rounds must be >= 1, got {reference_rounds}")
        self.reference_rounds = int(reference_rounds)
        self.threshold = float(threshold)
        # client id -> {"rounds": rounds in the reference, "sums": feature -> summed histogram}
        self._clients: dict[str, dict[str, Any]] = {}

    def score(self, client_id: str | int, rnd: int, stats: Mapping[str, Any]) -> dict[str, Any]:
        """Score one client's statistics of round ``rnd``; during its reference rounds: 0.

        Returns ``drift_score`` (max over features), ``drift_features`` (feature ->
        distance), ``drifted`` (score > threshold) and ``reference`` (True while the
        report went into the client's reference instead of being scored).
        """
        ref = self._clients.setdefault(str(client_id), {"rounds": [], "sums": {}})
        reference = len(ref["rounds"]) < self.reference_rounds
        if reference and rnd not in ref["rounds"]:  # a round reported twice counts once
            ref["rounds"].append(int(rnd))
            for f in HISTOGRAMS:
                hist, old = _normalised(stats[f]), ref["sums"].get(f)
                ref["sums"][f] = hist if old is None or old.shape != hist.shape else old + hist
        features = {
            f: 0.0 if reference else round(js_distance(ref["sums"][f], stats[f]), 4)
            for f in HISTOGRAMS
        }
        score = max(features.values())
        return {
            "drift_score": score,
            "drift_features": features,
            "drifted": score > self.threshold,
            "reference": reference,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (the references), for resume."""
        return {
            "reference_rounds": self.reference_rounds,
            "threshold": self.threshold,
            "clients": {
                cid: {
                    "rounds": list(ref["rounds"]),
                    "sums": {f: [float(v) for v in h] for f, h in ref["sums"].items()},
                }
                for cid, ref in self._clients.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the references; the threshold and reference_rounds stay as constructed."""
        self._clients = {
            str(cid): {
                "rounds": [int(r) for r in ref["rounds"]],
                "sums": {f: np.asarray(h, float) for f, h in ref["sums"].items()},
            }
            for cid, ref in state.get("clients", {}).items()
        }
