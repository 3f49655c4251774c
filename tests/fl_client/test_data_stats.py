"""Client data statistics (fl_client.data_stats); the shards come from tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord

from fl_client.data_stats import HISTOGRAMS, from_metrics, shard_stats, to_metrics
from fl_server.data import generate

NC = 4  # the synthetic data's classes
LENGTHS = {"brightness": 16, "contrast": 8, "classes": NC + 1, "box_size": 8}


def _stats(data_yaml: Path, seed: int, sample: int = 32) -> dict:
    return shard_stats(data_yaml, sample=sample, seed=seed, nc=NC)


def test_histograms_are_normalised_and_counts_right(shards):
    stats = _stats(shards["day"], seed=0)
    for name, length in LENGTHS.items():
        assert stats[name].shape == (length,)
        assert stats[name].sum() == pytest.approx(1.0)
        assert (stats[name] >= 0).all()
    assert (stats["images"], stats["unreadable"]) == (32, 0)
    assert shard_stats(shards["day"], sample=500, seed=0, nc=NC)["images"] == 48
    again = _stats(shards["day"], seed=0)
    assert all(np.array_equal(stats[k], again[k]) for k in HISTOGRAMS)  # seeded


def test_class_histogram_matches_the_labels(shards):
    labels = (shards["day"].parent / "labels").glob("*.txt")
    lines = [line for f in labels for line in f.read_text().splitlines()]
    counts = np.bincount([int(line.split()[0]) for line in lines], minlength=NC)
    stats = shard_stats(shards["day"], sample=48, seed=0, nc=NC)
    background = 48 - sum(
        1 for f in (shards["day"].parent / "labels").glob("*.txt") if f.stat().st_size
    )
    expected = np.append(counts, background)
    assert np.allclose(stats["classes"], expected / expected.sum())


def test_corrupt_image_and_bad_label_lines_are_skipped_and_counted(tmp_path):
    data_yaml = generate(tmp_path / "d", 6, imgsz=64, seed=0, domains=["day"])
    images, labels = data_yaml.parent / "images", data_yaml.parent / "labels"
    (images / "000000.jpg").write_bytes(b"not a jpeg")
    with (labels / "000001.txt").open("a") as f:
        # non-numeric, class 7 of 4, too short, NaN class, NaN size
        f.write(
            "1 0.5 oops 0.1 0.1\n7 0.5 0.5 0.1 0.1\n0 0.5\nnan 0.5 0.5 0.1 0.1\n0 0.5 0.5 nan 0.1\n"
        )
    (labels / "000002.txt").write_text("")  # no objects: a background image
    (labels / "000003.txt").unlink()  # no label file: background too
    stats = shard_stats(data_yaml, sample=6, seed=0, nc=NC)
    assert (stats["images"], stats["unreadable"]) == (5, 6)
    assert stats["classes"].sum() == pytest.approx(1.0)
    assert stats["classes"][NC] > 0


def test_metrics_round_trip_through_a_metric_record(shards):
    stats = _stats(shards["day"], seed=0)
    record = MetricRecord({"num-examples": 10, **to_metrics(stats)})
    back = from_metrics(record)
    assert back is not None
    for name in HISTOGRAMS:
        assert np.allclose(back[name], stats[name])
    assert (back["images"], back["unreadable"]) == (stats["images"], stats["unreadable"])
    assert from_metrics(MetricRecord({"loss": 1.0})) is None
