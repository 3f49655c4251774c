"""Data checks: every bad kind detected where planted, repaired or skipped as specified."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from fl_server.data import ISSUE_KINDS, DataError, check_dataset, check_image, load_dataset
from fl_server.data.samples import Dataset, Sample

GOOD = "0 0.5 0.5 0.2 0.2\n"

# image stem -> label text (None: no label file). "unreadable" and "truncated" get broken images.
PLANTED: dict[str, str | None] = {
    "good": "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n",
    "unreadable": GOOD,
    "truncated": GOOD,
    "columns": "0 0.5 0.5 0.2\n1 0.1 0.1 0.3 0.1 0.3 0.4\n0 0.5 0.5 0.2 0.2\n",
    "value": "0 0.5 abc 0.2 0.2\n0 0.5 0.5 0.2 0.2\n",
    "class": "2 0.5 0.5 0.2 0.2\n0.5 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n",
    "bounds": "0 0.95 0.5 0.2 0.2\n1 1.5 0.5 0.2 0.2\n",
    "zero": "0 0.5 0.5 0 0.2\n1 0.5 0.5 0.2 0.2\n",
    "dup": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n",
    "background": None,
}

EXPECTED = {
    ("unreadable_image", "unreadable.jpg", None, "skipped"),
    ("truncated_image", "truncated.jpg", None, "skipped"),
    ("bad_columns", "columns.txt", 1, "skipped"),
    ("bad_columns", "columns.txt", 2, "repaired"),
    ("bad_value", "value.txt", 1, "skipped"),
    ("class_out_of_range", "class.txt", 1, "skipped"),
    ("class_out_of_range", "class.txt", 2, "skipped"),
    ("out_of_bounds", "bounds.txt", 1, "repaired"),
    ("out_of_bounds", "bounds.txt", 2, "skipped"),
    ("zero_area", "zero.txt", 1, "skipped"),
    ("duplicate_label", "dup.txt", 2, "skipped"),
    ("background", "background.jpg", None, "kept"),
    ("orphan_label", "orphan.txt", None, "skipped"),
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def bad_root(tmp_path: Path, write_jpeg: Callable[..., Path]) -> Path:
    """A YOLO dataset with exactly one planted instance of every issue kind."""
    root = tmp_path / "bad"
    images, labels = root / "images" / "train", root / "labels" / "train"
    labels.mkdir(parents=True)
    for k, (stem, label) in enumerate(PLANTED.items()):
        write_jpeg(images / f"{stem}.jpg", size=48, seed=k)
        if label is not None:
            (labels / f"{stem}.txt").write_text(label)
    (images / "unreadable.jpg").write_bytes(b"this is not an image at all" * 20)
    data = (images / "truncated.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: int(len(data) * 0.6)])
    (labels / "orphan.txt").write_text(GOOD)
    (root / "data.yaml").write_text(
        yaml.safe_dump({"train": "images/train", "val": "images/train", "names": ["a", "b"]})
    )
    return root


def _found(issues: list) -> set[tuple]:
    return {(i.kind, Path(i.path).name, i.line, i.action) for i in issues}


def test_every_planted_issue_found_exactly_where_planted(bad_root: Path, tmp_path: Path) -> None:
    before = _snapshot(bad_root)
    report = check_dataset(load_dataset(bad_root), work_dir=tmp_path / "work")
    assert len(report.issues) == len(EXPECTED)
    assert _found(report.issues) == EXPECTED
    coco_only = {"unknown_category", "outside_dataset", "exif_rotated"}  # test_formats.py
    assert {i.kind for i in report.issues} == set(ISSUE_KINDS) - coco_only
    usable = {s.image.stem for s in report.usable}
    assert usable == set(PLANTED) - {"unreadable", "truncated"}
    assert len(report.usable) == 8
    assert _snapshot(bad_root) == before  # originals untouched, nothing added


def test_repaired_labels_are_clean_copies(bad_root: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    report = check_dataset(load_dataset(bad_root), work_dir=work)
    labels = {s.image.stem: s.label for s in report.usable}
    assert labels["good"] == bad_root / "labels" / "train" / "good.txt"  # untouched: original
    assert labels["background"] is None

    def rows(stem: str) -> list[list[float]]:
        label = labels[stem]
        assert label is not None and work in label.parents
        return [[float(v) for v in line.split()] for line in label.read_text().splitlines()]

    assert rows("columns") == [pytest.approx([1, 0.2, 0.25, 0.2, 0.3]), [0, 0.5, 0.5, 0.2, 0.2]]
    assert rows("bounds") == [pytest.approx([0, 0.925, 0.5, 0.15, 0.2])]
    assert rows("class") == [[1, 0.5, 0.5, 0.2, 0.2]]
    assert rows("zero") == [[1, 0.5, 0.5, 0.2, 0.2]]
    assert rows("dup") == [[0, 0.5, 0.5, 0.2, 0.2]]
    assert rows("value") == [[0, 0.5, 0.5, 0.2, 0.2]]


def test_without_repair_bad_labels_skip_their_image_and_nothing_is_written(
    bad_root: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    report = check_dataset(load_dataset(bad_root), work_dir=work, repair=False)
    assert {s.image.stem for s in report.usable} == {"good", "background"}
    assert not work.exists()
    assert {i.action for i in report.issues if i.kind != "background"} == {"skipped"}


def test_repair_needs_a_work_dir(bad_root: Path) -> None:
    with pytest.raises(DataError, match="work_dir") as err:
        check_dataset(load_dataset(bad_root))
    assert "\n" not in str(err.value)


def test_report_counts_json_and_summary(bad_root: Path, tmp_path: Path) -> None:
    report = check_dataset(load_dataset(bad_root), work_dir=tmp_path / "work")
    counts = report.counts
    assert list(counts) == list(ISSUE_KINDS)
    assert (
        counts["bad_columns"] == 2
        and counts["class_out_of_range"] == 2
        and counts["zero_area"] == 1
    )
    data = json.loads(report.write(tmp_path / "out" / "report.json").read_text())
    assert data["images"] == 10 and data["usable"] == 8 and data["counts"] == counts
    assert len(data["issues"]) == len(EXPECTED)
    summary = report.summary(examples=1)
    assert "10 images, 8 usable" in summary
    found = [kind for kind, n in counts.items() if n]
    assert all(kind in summary for kind in found)
    for kind in found:  # each kind names its first file (and line) and what was wrong
        first = next(i for i in report.issues if i.kind == kind)
        where = first.path if first.line is None else f"{first.path}:{first.line}"
        assert f"    {where}: {first.detail}" in summary
    more = sum(1 for kind in found if counts[kind] > 1)
    assert len(summary.splitlines()) == 2 + 2 * len(found) + more


def test_all_bad_dataset_raises_one_line(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        (images / f"junk{k}.jpg").write_bytes(b"\x00\x01garbage" * 10)
    ds = Dataset(
        names=["a"],
        samples=[Sample(p, None, "train") for p in sorted(images.iterdir())],
        root=tmp_path,
    )
    with pytest.raises(DataError, match="no usable images") as err:
        check_dataset(ds)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message and "2 unreadable_image" in message


def test_empty_dataset_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no usable images"):
        check_dataset(Dataset(names=["a"], samples=[], root=tmp_path))


def test_clean_synthetic_dataset_has_no_issues(synth_ds: Dataset) -> None:
    report = check_dataset(synth_ds)
    assert report.issues == []
    assert report.usable == synth_ds.samples


def test_check_image_variants(tmp_path: Path, write_jpeg: Callable[..., Path]) -> None:
    import cv2
    import numpy as np

    good = write_jpeg(tmp_path / "ok.jpg")
    assert check_image(good) is None
    no_eoi = tmp_path / "no_eoi.jpg"
    no_eoi.write_bytes(good.read_bytes()[:-2])
    assert check_image(no_eoi).kind == "truncated_image"
    png = tmp_path / "ok.png"
    cv2.imwrite(str(png), np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    assert check_image(png) is None
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    assert check_image(cut).kind == "truncated_image"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert check_image(empty).kind == "unreadable_image"
    assert check_image(tmp_path / "missing.jpg").kind == "unreadable_image"


def test_coco_cache_labels_are_not_orphans(tmp_path: Path, write_jpeg: Callable[..., Path]) -> None:
    write_jpeg(tmp_path / "images" / "a.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 48, "height": 48}],
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10]}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    report = check_dataset(load_dataset(tmp_path / "coco.json"))
    assert report.issues == [] and len(report.usable) == 1


def test_unreadable_label_file_skips_its_image(
    tmp_path: Path, write_jpeg: Callable[..., Path]
) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    labels.mkdir()
    for stem in ("ok", "binary"):
        write_jpeg(images / f"{stem}.jpg")
    (labels / "ok.txt").write_text(GOOD)
    (labels / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [a]\n")
    report = check_dataset(load_dataset(tmp_path), work_dir=tmp_path / "work")
    assert _found(report.issues) == {("bad_value", "binary.txt", None, "skipped")}
    assert [s.image.stem for s in report.usable] == ["ok"]


def test_garbage_image_is_unreadable_even_with_ultralytics_patches(tmp_path):
    """Ultralytics patches PIL's Image.open (HEIF retry); the check must still classify."""
    import ultralytics.utils.patches  # noqa: F401  (installs the patch, as in every fedyolo run)

    from fl_server.data import check_image

    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"this is not an image")
    issue = check_image(bad)
    assert issue is not None and issue.kind == "unreadable_image"
    # Not Ultralytics' "No module named 'pi_heif'": what the file is.
    assert issue.detail == "not an image: the file holds text ('this is not an image'...)"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    assert check_image(bad).detail.startswith("cannot decode: damaged JPEG data")
    bad.write_bytes(bytes([0, 1, 2, 250, 251, 252, 7, 8]) * 20)
    assert (
        check_image(bad).detail
        == "not an image: unknown format (first bytes 00 01 02 fa fb fc 07 08)"
    )
    bad.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    assert "heic image; reading it needs the pi-heif package" in check_image(bad).detail
