"""Per-client data-drift scores on the server (fl_server.data_drift), on real client statistics
(``fl_client.data_stats``) of the shared tiny shards (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fl_client.data_stats import shard_stats
from fl_server.data_drift import DriftMonitor, js_distance

NC = 4  # the synthetic data's classes


def _stats(data_yaml: Path, seed: int, sample: int = 32) -> dict:
    return shard_stats(data_yaml, sample=sample, seed=seed, nc=NC)


def test_js_distance_bounds_and_empty_histograms():
    assert js_distance([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_distance([0, 0], [0, 0]) == 0.0
    assert js_distance([0, 0], [1, 0]) == 1.0
    assert js_distance([1, 0], [1, 0, 0]) == 1.0
    assert js_distance([np.nan, -1, 2], [0, 0, 1]) == 0.0  # a bad report cannot poison a score


def test_same_domain_resample_stays_below_threshold(shards):
    monitor = DriftMonitor(reference_rounds=1, threshold=0.25)
    first = monitor.score("0", 1, _stats(shards["day"], seed=1))
    assert first["reference"] and first["drift_score"] == 0.0 and not first["drifted"]
    for rnd in (2, 3, 4):
        score = monitor.score("0", rnd, _stats(shards["day"], seed=rnd))
        assert not score["reference"]
        assert 0.0 < score["drift_score"] < monitor.threshold, score


def test_day_to_night_flags_that_client_only_and_survives_resume(shards):
    monitor = DriftMonitor(reference_rounds=1, threshold=0.25)
    monitor.score("0", 1, _stats(shards["day"], seed=1))
    monitor.score("1", 1, _stats(shards["day2"], seed=1))
    resumed = DriftMonitor(reference_rounds=1, threshold=0.25)
    resumed.load_state_dict(json.loads(json.dumps(monitor.state_dict())))

    night = _stats(shards["night"], seed=2)
    same = _stats(shards["day2"], seed=2)
    flagged, calm = monitor.score("0", 2, night), monitor.score("1", 2, same)
    assert flagged["drifted"] and flagged["drift_score"] > 0.5
    assert max(flagged["drift_features"], key=flagged["drift_features"].get) in (
        "brightness",
        "contrast",
    )
    assert not calm["drifted"]
    assert resumed.score("0", 2, night) == flagged
    assert resumed.score("1", 2, same) == calm


def test_reference_averages_the_first_rounds_once_each():
    hist = {"brightness": [1.0, 0.0], "contrast": [1.0], "classes": [1.0], "box_size": [1.0]}
    other = {**hist, "brightness": [0.0, 1.0]}
    monitor = DriftMonitor(reference_rounds=2, threshold=0.25)
    assert monitor.score(3, 1, hist)["reference"]
    assert monitor.score(3, 1, other)["reference"]  # round 1 again: not counted twice
    assert monitor.score(3, 2, other)["reference"]  # reference: (1, 0) and (0, 1) averaged
    score = monitor.score(3, 3, hist)
    assert not score["reference"]
    assert score["drift_features"]["brightness"] == pytest.approx(
        js_distance([1, 1], [1, 0]), abs=1e-4
    )
