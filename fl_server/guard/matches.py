"""Per-image matches: the evaluation's evidence the guard resamples, kept on disk and scored again.

``save_images``/``load_images`` write and read one evaluation's matches as a plain ``.npz``
(``output.save_matches``), and ``metric_of``/``_map`` recompute mAP50-95 or mAP50 from them on
any subset of the held-out images, as Ultralytics computes it: what ``fl_server.guard.stats``
bootstraps and ``benchmarks/guard_replay.py`` replays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_images(path, images: dict) -> None:
    """Write one evaluation's per-image matches (``evaluate_checkpoint(keep_images=True)``) as
    a plain ``.npz`` (no pickle): the arrays concatenated, with each image's offsets. What
    ``output.save_matches`` keeps per round, so a rule can be replayed on a finished run
    (``benchmarks/guard_replay.py``)."""

    def flat(key: str, width: int | None = None):
        parts = [np.asarray(a) for a in images[key]]
        sizes = np.array([len(a) for a in parts], dtype=np.int64)
        empty = np.zeros((0, width) if width else (0,))
        return (np.concatenate(parts) if parts else empty), np.concatenate([[0], np.cumsum(sizes)])

    tp, pred_at = flat("tp", 10)
    conf, _ = flat("conf")
    pred_cls, _ = flat("pred_cls")
    target_cls, target_at = flat("target_cls")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        names=np.array(images["names"], dtype=str),
        tp=tp.astype(bool),
        conf=conf,  # as the validator made them (float32 there): the same mAP when reloaded
        pred_cls=pred_cls,
        target_cls=target_cls,
        pred_at=pred_at,
        target_at=target_at,
    )
    tmp.replace(path)


def load_images(path) -> dict:
    """The per-image matches ``save_images`` wrote."""
    with np.load(path, allow_pickle=False) as z:
        pa, ta = z["pred_at"], z["target_at"]
        n = len(z["names"])
        return {
            "names": [str(x) for x in z["names"]],
            **{k: [z[k][pa[i] : pa[i + 1]] for i in range(n)] for k in ("tp", "conf", "pred_cls")},
            "target_cls": [z["target_cls"][ta[i] : ta[i + 1]] for i in range(n)],
        }


def metric_of(images: dict, metric: str) -> float:
    """``metric`` over all the images of kept per-image matches: what the evaluation reported."""
    return _map(images, np.arange(len(images["names"])), metric)


def _map(images: dict, idx: np.ndarray, metric: str) -> float:
    """mAP50-95 (or mAP50) of the images ``idx`` (repeats allowed), as Ultralytics computes it."""
    from fl_client.ultralytics_adapter import ap_per_threshold

    target = np.concatenate([images["target_cls"][i] for i in idx])
    if target.size == 0:
        return 0.0
    tp = np.concatenate([images["tp"][i] for i in idx])
    conf = np.concatenate([images["conf"][i] for i in idx])
    pred = np.concatenate([images["pred_cls"][i] for i in idx])
    ap = ap_per_threshold(tp, conf, pred, target)  # (classes with targets, 10 IoU thresholds)
    if not len(ap):
        return 0.0
    return float(ap[:, 0].mean() if metric == "map50" else ap.mean())
