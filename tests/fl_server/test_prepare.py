"""Run preparation on a user's dataset with bad files: reported, skipped, nothing else lost."""

from __future__ import annotations

import json
import shutil

import pytest

from fl_server.config import compose
from fl_server.data import generate
from fl_server.prepare import prepare_run


def test_bad_files_are_reported_and_excluded_from_every_shard(tmp_path):
    data_yaml = generate(tmp_path / "ds", 40, imgsz=64, seed=3, domains=["day"])
    root = data_yaml.parent
    images = sorted((root / "images").glob("*.jpg"))
    images[0].write_bytes(b"not a jpeg at all")  # unreadable
    raw = images[1].read_bytes()
    images[1].write_bytes(raw[: len(raw) // 2])  # truncated
    (root / "labels" / f"{images[2].stem}.txt").write_text("0 0.5 0.5 0.2\n")  # 4 columns
    (root / "labels" / f"{images[3].stem}.txt").write_text("9 0.5 0.5 0.2 0.2\n")  # class 9
    shutil.copy(root / "labels" / f"{images[4].stem}.txt", root / "labels" / "ghost.txt")

    cfg = compose(
        [
            f"data.path={data_yaml}",
            f"output.dir={tmp_path / 'runs'}",
            "name=r",
            "federation.clients=2",
            "model=tiny",
        ]
    )
    run = prepare_run(cfg)

    report = json.loads((run.path / "data_check.json").read_text())
    kinds = {i["kind"] for i in report["issues"]}
    assert {
        "unreadable_image",
        "truncated_image",
        "bad_columns",
        "class_out_of_range",
        "orphan_label",
    } <= kinds
    in_shards = {p.resolve() for p in run.data.rglob("images/*")}  # symlinks to the originals
    assert images[0].resolve() not in in_shards and images[1].resolve() not in in_shards
    assert images[5].resolve() in in_shards
    manifest = json.loads(run.manifest.read_text())
    used = manifest["data"]["server_val_images"] + sum(
        c["train_images"] + c["val_images"] for c in manifest["data"]["clients"]
    )
    assert used == 38  # 40 images minus the unreadable and the truncated one
    assert manifest["data"]["check_issues"] == len(report["issues"])
    assert sorted(p.name for p in (run.data / "repaired_labels").iterdir())  # kept with the run
    assert sorted(p.name for p in run.path.parent.iterdir()) == ["r"]  # no staging left


def test_overwrite_replaces_a_run_only_once_the_new_data_is_ready(tmp_path):
    from fl_client.data import DataError

    data_yaml = generate(tmp_path / "ds", 12, imgsz=64, seed=3, domains=["day"])
    base = [f"output.dir={tmp_path / 'runs'}", "name=r", "federation.clients=2", "model=tiny"]
    run = prepare_run(compose([*base, f"data.path={data_yaml}"]))
    for f in (run.best, run.state, run.metrics, run.summary):
        f.write_text("the old run's results")
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}

    broken = tmp_path / "broken" / "data.yaml"
    broken.parent.mkdir()
    broken.write_text("names: [a]\ntrain: nowhere\nval: nowhere\n")
    overwrite = [*base, "output.overwrite=true"]
    with pytest.raises(DataError, match="nowhere"):
        prepare_run(compose([*overwrite, f"data.path={broken}"]))
    # ... and the old run is exactly as it was
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run.path.parent.iterdir()) == ["r"]

    again = prepare_run(compose([*overwrite, f"data.path={data_yaml}"]))
    assert again.path == run.path and not run.best.exists() and not run.summary.exists()
    assert run.manifest.exists() and (run.data / "manifest.json").exists()
    assert sorted(p.name for p in run.path.parent.iterdir()) == ["r"]
