"""Evidence on each client beside the held-out score: how its update agrees with the others'
(``update_agreement``), and the contribution rule replayed on a finished run's kept matches
(``replay_contributions``). The rule itself is ``Guard.contributions``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fl_server.guard.matches import load_images, metric_of
from fl_server.records import RoundRecord

if TYPE_CHECKING:
    from fl_server.guard.rule import Guard


def update_agreement(base: np.ndarray, updates: dict[str, np.ndarray], mask) -> dict[str, float]:
    """Per client k: the median, over the other clients j, of the cosine between k's update
    (its returned weights minus ``base``, the global model it was sent, on ``mask``) and j's.
    The median, not the cosine with the others' mean: one client pulling hard the other way
    would drag that mean, and every honest client's agreement with it, to ~0. Evidence recorded
    next to the contribution score (``cls_agreement``: on the detection layer's classification
    branch, where training on wrong labels pulls against the others)."""
    keys = sorted(updates)
    d = np.stack([updates[k][mask].astype(np.float64) - base[mask] for k in keys])
    norms = np.linalg.norm(d, axis=1)
    norms[norms == 0] = np.inf  # no update: agrees with nobody (cosine 0)
    unit = d / norms[:, None]
    cos = unit @ unit.T
    return {k: float(np.median(np.delete(cos[i], i))) for i, k in enumerate(keys) if len(keys) > 1}


def replay_contributions(guard: Guard, eval_dir, rounds: list[RoundRecord]) -> dict[int, dict]:
    """``guard.contributions`` again, round after round, on a finished run's kept matches
    (``output.save_matches``: ``eval/round_NNNN_all.npz`` and ``..._without_<k>.npz``) and the
    repliers in its ``metrics.jsonl`` records (with their ``cls_agreement``): round → per-client
    scores, for the rounds that kept them (a client the round did not score,
    ``guard.contribution_sample``, has no kept matches and is left out as the run left it out).
    A rule can so be tried on a run after the fact."""
    eval_dir = Path(eval_dir)
    out = {}
    for rec in sorted(rounds, key=lambda r: r["round"]):
        rnd = rec["round"]
        everyone = eval_dir / f"round_{rnd:04d}_all.npz"
        if not everyone.is_file():
            continue
        ids = [str(c["id"]) for c in rec["clients"]]
        without = {
            k: _scored(load_images(p), guard.metric)
            for k in ids
            if (p := eval_dir / f"round_{rnd:04d}_without_{k}.npz").is_file()
        }
        everyone_res = _scored(load_images(everyone), guard.metric)
        agreement = {str(c["id"]): c.get("cls_agreement") for c in rec["clients"]}
        out[rnd] = guard.contributions(rnd, everyone_res, without, agreement)
    return out


def _scored(images: dict, metric: str) -> dict:
    return {metric: metric_of(images, metric), "images": images}
