"""Partitioning: disjoint shards, server-only validation, skew, determinism, written shards."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from fl_server.config import CONFIG_DIR
from fl_server.data import (
    METHODS,
    DataError,
    Dataset,
    Sample,
    load_dataset,
    write_partition,
)
from fl_server.data import partition as partition_with
from fl_server.data.partition import Partition, label_classes

DATA = yaml.safe_load((CONFIG_DIR / "data" / "default.yaml").read_text())


def partition(samples, num_clients: int, method: str | None = None, **knobs) -> Partition:
    """``partition`` with the run's defaults (``configs/data``) for the knobs a test leaves out."""
    defaults = {k: DATA[k] for k in ("alpha", "server_val_fraction", "client_val_fraction")}
    return partition_with(
        samples, num_clients, method or DATA["partition"], **{"seed": 0, **defaults, **knobs}
    )


def _ids(samples: list[Sample]) -> set[str]:
    return {str(s.image) for s in samples}


def _layout(part: Partition) -> list[list[list[str]]]:
    return [[[str(s.image) for s in c.train], [str(s.image) for s in c.val]] for c in part.clients]


@pytest.mark.parametrize("method", METHODS)
def test_shards_are_disjoint_and_cover_everything(synth_ds: Dataset, method: str) -> None:
    part = partition(synth_ds.samples, 4, method=method, alpha=0.3, seed=1)
    server = _ids(part.server_val)
    shards = [_ids(c.train) | _ids(c.val) for c in part.clients]
    for c in part.clients:
        assert not _ids(c.train) & _ids(c.val)
        assert len(c.train) >= 1 and len(c.val) >= 1
    for a, b in itertools.combinations(shards, 2):
        assert not a & b
    assert all(not shard & server for shard in shards)
    assert set.union(server, *shards) == _ids(synth_ds.samples)
    assert len(part.server_val) + sum(len(c.train) + len(c.val) for c in part.clients) == 64


def test_server_val_is_stratified_by_domain(synth_ds: Dataset) -> None:
    part = partition(synth_ds.samples, 4, server_val_fraction=0.15)
    assert Counter(s.attrs["domain"] for s in part.server_val) == {
        "day": 2,
        "night": 2,
        "fog": 2,
        "rain": 2,
    }
    assert partition(synth_ds.samples, 4, server_val_fraction=0).server_val == []


def test_server_val_keeps_a_rare_domain(synth_ds: Dataset) -> None:
    """A domain too small for its share to round up still gets one server image (and keeps one)."""
    samples = [
        Sample(s.image, s.label, s.split, {"domain": "rare" if i < 3 else "common"})
        for i, s in enumerate(synth_ds.samples)
    ]
    part = partition(samples, 2, server_val_fraction=0.1)
    assert Counter(s.attrs["domain"] for s in part.server_val) == {"rare": 1, "common": 6}
    lone = [Sample(synth_ds.samples[0].image, None, "train", {"domain": "lone"}), *samples[3:]]
    assert "lone" not in {s.attrs["domain"] for s in partition(lone, 2).server_val}


def _mean_tv(part: Partition, nc: int = 4) -> float:
    """Mean total-variation distance between each client's class distribution and the global one."""
    counts = np.array(
        [
            np.bincount([k for s in c.samples for k in label_classes(s.label)], minlength=nc)
            for c in part.clients
        ],
        float,
    )
    overall = counts.sum(0) / counts.sum()
    return float(np.mean([0.5 * np.abs(row / row.sum() - overall).sum() for row in counts]))


def test_dirichlet_with_small_alpha_is_more_skewed_than_iid(synth_ds: Dataset) -> None:
    seeds = range(5)
    iid = np.mean([_mean_tv(partition(synth_ds.samples, 4, "iid", seed=s)) for s in seeds])
    skewed = np.mean(
        [_mean_tv(partition(synth_ds.samples, 4, "dirichlet", alpha=0.1, seed=s)) for s in seeds]
    )
    assert skewed > 2 * iid, (skewed, iid)


def test_dirichlet_gives_every_client_at_least_two_train_images(synth_ds: Dataset) -> None:
    part = partition(synth_ds.samples, 10, "dirichlet", alpha=0.05, seed=3)
    assert all(len(c.train) >= 2 and len(c.val) >= 1 for c in part.clients)


@pytest.mark.parametrize(("clients", "per_client", "uses"), [(4, 1, 1), (8, 1, 2), (2, 2, 1)])
def test_domain_method(synth_ds: Dataset, clients: int, per_client: int, uses: int) -> None:
    """clients == domains: one each; more clients: domains shared; fewer: several per client."""
    part = partition(synth_ds.samples, clients, "domain", seed=0)
    domains = [{s.attrs["domain"] for s in c.samples} for c in part.clients]
    assert all(len(d) == per_client for d in domains)
    use = Counter(name for d in domains for name in d)
    assert set(use) == {"day", "night", "fog", "rain"} and set(use.values()) == {uses}


def test_deterministic_by_seed_and_input_order(synth_ds: Dataset) -> None:
    shuffled = list(reversed(synth_ds.samples))
    for method in METHODS:
        a = partition(synth_ds.samples, 3, method, seed=4)
        b = partition(shuffled, 3, method, seed=4)
        assert _layout(a) == _layout(b) and a.server_val == b.server_val
    assert _layout(partition(synth_ds.samples, 3, seed=4)) != _layout(
        partition(synth_ds.samples, 3, seed=5)
    )


def test_client_val_fraction(synth_ds: Dataset) -> None:
    part = partition(synth_ds.samples, 2, client_val_fraction=0.25, server_val_fraction=0)
    assert [len(c.val) for c in part.clients] == [8, 8]
    assert all(c.val == [] for c in partition(synth_ds.samples, 2, client_val_fraction=0).clients)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 65}, "num_clients"),
        ({"num_clients": 30}, "num_clients"),  # too few images per client after server_val
        ({"method": "bogus"}, "method"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"server_val_fraction": 0.95}, "server_val_fraction"),
        ({"client_val_fraction": -0.1}, "client_val_fraction"),
    ],
)
def test_invalid_parameters_raise_one_line(synth_ds: Dataset, kwargs: dict, name: str) -> None:
    args = {"num_clients": 2, **kwargs}
    with pytest.raises(DataError, match=name) as err:
        partition(synth_ds.samples, **args)
    assert "\n" not in str(err.value)


def test_write_partition_layout_and_manifest(synth_ds: Dataset, tmp_path: Path) -> None:
    part = partition(synth_ds.samples, 3, "dirichlet", alpha=0.5, seed=2)
    manifest = json.loads(write_partition(part, synth_ds.names, tmp_path / "out").read_text())
    assert (
        manifest["method"] == "dirichlet" and manifest["num_clients"] == 3 and manifest["seed"] == 2
    )
    assert manifest["names"] == synth_ds.names
    assert manifest["server_val"]["images"] == len(part.server_val)
    server_cfg = yaml.safe_load((tmp_path / "out" / "server_val" / "data.yaml").read_text())
    assert server_cfg["train"] == server_cfg["val"] == "images" and server_cfg["nc"] == 4
    originals = {str(s.image): s for s in synth_ds.samples}
    for shard, entry in zip(part.clients, manifest["clients"], strict=True):
        folder = tmp_path / "out" / f"client_{shard.id}"
        cfg = yaml.safe_load((folder / "data.yaml").read_text())
        assert cfg["path"] == str(folder.resolve()) and (cfg["train"], cfg["val"]) == (
            "train/images",
            "val/images",
        )
        assert (entry["train_images"], entry["val_images"]) == (len(shard.train), len(shard.val))
        for image in (folder / "train" / "images").iterdir():
            target = Path(os.readlink(image))
            assert image.is_symlink() and target.is_absolute()
            label = folder / "train" / "labels" / f"{image.stem}.txt"
            assert not label.is_symlink()
            assert label.read_text() == originals[str(target)].label.read_text()
        objects = sum(len(label_classes(s.label)) for s in shard.samples)
        assert sum(entry["class_counts"].values()) == objects
        assert sum(entry["domains"].values()) == len(shard.samples)
    # a shard's images link into the dataset it was cut from: named, they are followed
    reloaded = load_dataset(tmp_path / "out" / "client_0" / "data.yaml", links_into=[synth_ds.root])
    assert len(reloaded.samples) == len(part.clients[0].samples) and not reloaded.issues
    assert all(s.label is not None for s in reloaded.samples)
    domains = Counter(s.attrs["domain"] for s in reloaded.samples)  # via the symlinks' meta.jsonl
    assert domains == manifest["clients"][0]["domains"]


def test_write_partition_is_idempotent_and_clears_stale_shards(
    synth_ds: Dataset, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    write_partition(partition(synth_ds.samples, 4, seed=0), synth_ds.names, out)
    first = json.loads(
        write_partition(partition(synth_ds.samples, 2, seed=0), synth_ds.names, out).read_text()
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "client_0",
        "client_1",
        "manifest.json",
        "server_val",
    ]
    again = json.loads(
        write_partition(partition(synth_ds.samples, 2, seed=0), synth_ds.names, out).read_text()
    )
    fresh = json.loads(
        write_partition(
            partition(synth_ds.samples, 2, seed=0), synth_ds.names, tmp_path / "b"
        ).read_text()
    )
    assert first == again
    assert first["data_version"] == fresh["data_version"]  # content hashes, not paths


def test_manifest_hash_changes_when_one_label_changes(synth_yaml: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_yaml.parent, data)
    (data / "data.yaml").write_text(
        synth_yaml.read_text().replace(str(synth_yaml.parent.resolve()), str(data))
    )

    def manifest(name: str) -> tuple[Partition, dict]:
        ds = load_dataset(data)
        part = partition(ds.samples, 3, seed=0)
        return part, json.loads(write_partition(part, ds.names, tmp_path / name).read_text())

    part, before = manifest("before")
    changed = part.clients[1].train[0].label
    assert changed is not None
    changed.write_text(changed.read_text() + "0 0.5 0.5 0.1 0.1\n")
    _, after = manifest("after")
    assert after["data_version"] != before["data_version"]
    assert after["server_val"]["sha256"] == before["server_val"]["sha256"]
    shas = [
        (b["sha256"], a["sha256"]) for b, a in zip(before["clients"], after["clients"], strict=True)
    ]
    assert [x == y for x, y in shas] == [True, False, True]


def test_equal_basenames_get_unique_files(tmp_path: Path, write_jpeg) -> None:
    samples = []
    for folder in ("a", "b"):
        image = write_jpeg(tmp_path / folder / "images" / "x.jpg", seed=len(samples))
        samples.append(Sample(image, None, "train", {"domain": folder}))
    part = partition(samples, 1, server_val_fraction=0, client_val_fraction=0)
    write_partition(part, ["car"], tmp_path / "out")
    linked = sorted((tmp_path / "out" / "client_0" / "train" / "images").iterdir())
    assert len(linked) == 2 and len({p.resolve() for p in linked}) == 2
    assert not any(
        (tmp_path / "out" / "client_0" / "train" / "labels").iterdir()
    )  # background: no label
