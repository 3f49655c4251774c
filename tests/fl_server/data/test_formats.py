"""Dataset loading: Ultralytics yaml variants, Roboflow exports, COCO JSON, errors."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from fl_client.data.formats import COCO_CACHE_DIR, label_path_for
from fl_server.data import DOMAINS, DataError, load_dataset

LABEL = "0 0.5 0.5 0.2 0.2\n"


def _yolo_images(
    write_jpeg: Callable[..., Path], images_dir: Path, n: int, labelled: bool = True
) -> list[Path]:
    """n JPEGs in images_dir with their labels in the mirrored labels/ folder."""
    paths = []
    for k in range(n):
        image = write_jpeg(images_dir / f"img_{k}.jpg", size=16, seed=k)
        if labelled:
            label = label_path_for(image)
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(LABEL)
        paths.append(image)
    return paths


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_ultralytics_yaml_with_dirs(tmp_path: Path, write_jpeg: Callable[..., Path]) -> None:
    _yolo_images(write_jpeg, tmp_path / "images" / "train", 3)
    _yolo_images(write_jpeg, tmp_path / "images" / "val", 2)
    cfg = {"path": ".", "train": "images/train", "val": "images/val", "names": ["a", "b"]}
    ds = load_dataset(_write_yaml(tmp_path / "data.yaml", cfg))
    assert ds.names == ["a", "b"] and ds.nc == 2
    assert ds.root == tmp_path.resolve()
    assert Counter(s.split for s in ds.samples) == {"train": 3, "val": 2}
    for s in ds.samples:
        assert s.label is not None and s.label.read_text() == LABEL
        assert s.label == s.image.parent.parent.parent / "labels" / s.split / f"{s.image.stem}.txt"


def test_path_key_is_relative_to_the_yaml(tmp_path: Path, write_jpeg: Callable[..., Path]) -> None:
    _yolo_images(write_jpeg, tmp_path / "ds" / "images" / "train", 2)
    cfg = {"path": "../ds", "train": "images/train", "val": "images/train", "names": {0: "a"}}
    ds = load_dataset(_write_yaml(tmp_path / "cfg" / "data.yaml", cfg))
    assert ds.root == (tmp_path / "ds").resolve()
    assert len(ds.samples) == 2  # train and val are the same images: not duplicated
    assert {s.split for s in ds.samples} == {"train"}


def test_txt_list_and_dict_names(tmp_path: Path, write_jpeg: Callable[..., Path]) -> None:
    imgs = _yolo_images(write_jpeg, tmp_path / "images" / "all", 4)
    (tmp_path / "train.txt").write_text(
        f"./images/all/img_0.jpg\n\n./images/all/img_1.jpg\n{imgs[2]}\n"
    )
    cfg = {"train": "train.txt", "val": "images/all", "names": {1: "b", 0: "a"}}
    ds = load_dataset(_write_yaml(tmp_path / "data.yaml", cfg))
    assert ds.names == ["a", "b"]
    by_split = {s.image.name: s.split for s in ds.samples}
    assert by_split == {
        "img_0.jpg": "train",
        "img_1.jpg": "train",
        "img_2.jpg": "train",
        "img_3.jpg": "val",
    }
    assert all(s.label is not None for s in ds.samples)


def test_list_of_dirs_and_folder_domains(tmp_path: Path, write_jpeg: Callable[..., Path]) -> None:
    _yolo_images(write_jpeg, tmp_path / "day" / "images", 2)
    _yolo_images(write_jpeg, tmp_path / "night" / "images", 3, labelled=False)
    cfg = {"train": ["day/images", "night/images"], "val": "day/images", "names": ["a"]}
    ds = load_dataset(_write_yaml(tmp_path / "data.yaml", cfg))
    assert Counter(s.attrs["domain"] for s in ds.samples) == {"day": 2, "night": 3}
    assert [s.label is None for s in ds.samples] == [False, False, True, True, True]


def _roboflow_export(root: Path, write_jpeg: Callable[..., Path], with_test: bool = True) -> None:
    _yolo_images(write_jpeg, root / "train" / "images", 3)
    _yolo_images(write_jpeg, root / "valid" / "images", 2)
    if with_test:
        _yolo_images(write_jpeg, root / "test" / "images", 1)
    cfg = {
        "train": "../train/images",
        "val": "../valid/images",
        "test": "../test/images",
        "nc": 2,
        "names": ["car", "person"],
        "roboflow": {"workspace": "w", "project": "p", "version": 1},
    }
    _write_yaml(root / "data.yaml", cfg)


def test_roboflow_export_with_dotdot_paths(tmp_path: Path, write_jpeg: Callable[..., Path]) -> None:
    export = tmp_path / "export"
    _roboflow_export(export, write_jpeg)
    for path in (export, export / "data.yaml"):
        ds = load_dataset(path)
        assert ds.names == ["car", "person"]
        assert Counter(s.split for s in ds.samples) == {"train": 3, "val": 2, "test": 1}
        assert all(s.label is not None and s.label.is_file() for s in ds.samples)
        assert all(export.resolve() in s.image.resolve().parents for s in ds.samples)


def test_roboflow_export_without_test_folder(
    tmp_path: Path, write_jpeg: Callable[..., Path]
) -> None:
    _roboflow_export(tmp_path, write_jpeg, with_test=False)
    ds = load_dataset(tmp_path)
    assert Counter(s.split for s in ds.samples) == {"train": 3, "val": 2}


def test_split_folders_found_without_split_keys(
    tmp_path: Path, write_jpeg: Callable[..., Path]
) -> None:
    _yolo_images(write_jpeg, tmp_path / "train" / "images", 2)
    _yolo_images(write_jpeg, tmp_path / "valid" / "images", 1)
    _write_yaml(tmp_path / "data.yaml", {"names": ["a"]})
    ds = load_dataset(tmp_path)
    assert Counter(s.split for s in ds.samples) == {"train": 2, "val": 1}


def test_meta_jsonl_attrs_from_synthetic_data(synth_yaml: Path) -> None:
    ds = load_dataset(synth_yaml.parent)
    assert len(ds.samples) == 64
    assert [s.attrs["domain"] for s in ds.samples[:4]] == ["day", "night", "fog", "rain"]
    assert all(s.attrs["class_mix"] in ("urban", "highway") for s in ds.samples)
    assert set(DOMAINS) >= {s.attrs["domain"] for s in ds.samples}


def _image(path: Path, width: int, height: int, orientation: int = 1) -> Path:
    """A JPEG of width x height stored pixels, with an EXIF orientation tag unless it is 1."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (width, height), (90, 120, 30))
    exif = im.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    im.save(path, "JPEG", exif=exif.tobytes())
    return path


def _coco(tmp_path: Path, write_jpeg: Callable[..., Path]) -> Path:
    _image(tmp_path / "images" / "a.jpg", 50, 100)  # a half-size copy of the annotated 100x200
    write_jpeg(tmp_path / "images" / "b.jpg", size=16)
    coco = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 200},
            {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50},
        ],
        "categories": [{"id": 7, "name": "truck"}, {"id": 3, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 100, 200]},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 5, 5], "iscrowd": 1},
        ],
    }
    path = tmp_path / "instances_train.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_json_converted_to_yolo(tmp_path: Path, write_jpeg: Callable[..., Path]) -> None:
    ds = load_dataset(_coco(tmp_path, write_jpeg))
    assert ds.names == ["person", "truck"]  # sorted by category id: 3 -> 0, 7 -> 1
    a, b = ds.samples
    assert a.image == tmp_path / "images" / "a.jpg" and a.split == "train"
    assert b.label is None  # no annotations: background
    assert a.label is not None and COCO_CACHE_DIR in a.label.parts
    assert not a.label.resolve().is_relative_to(tmp_path.resolve())  # never in the dataset
    rows = [[float(v) for v in line.split()] for line in a.label.read_text().splitlines()]
    assert rows == [
        pytest.approx([1, (10 + 15) / 100, (20 + 20) / 200, 30 / 100, 40 / 200]),
        pytest.approx([0, 0.5, 0.5, 1.0, 1.0]),
    ]  # the crowd annotation is skipped
    again = load_dataset(tmp_path / "instances_train.json")
    assert again.samples == ds.samples


def test_coco_ids_and_file_names_cannot_leave_their_folders(
    tmp_path: Path, write_jpeg: Callable[..., Path]
) -> None:
    data = tmp_path / "data"
    write_jpeg(data / "images" / "a.jpg", size=16)
    write_jpeg(tmp_path / "outside.jpg", size=16)
    coco = {
        "images": [
            {"id": "../../../escaped", "file_name": "a.jpg", "width": 10, "height": 10},
            {"id": 2, "file_name": "../outside.jpg", "width": 10, "height": 10},
            {"id": 3, "file_name": str(tmp_path / "outside.jpg"), "width": 10, "height": 10},
        ],
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [
            {"id": i, "image_id": img, "category_id": 1, "bbox": [1, 1, 2, 2]}
            for i, img in enumerate(["../../../escaped", 2, 3])
        ],
    }
    (data / "c.json").write_text(json.dumps(coco))
    cache = tmp_path / "cache"
    ds = load_dataset(data / "c.json", cache_dir=cache)
    (only,) = ds.samples  # the two images outside the dataset folder are not read
    assert only.image == data / "images" / "a.jpg"
    assert only.label is not None and only.label.resolve().is_relative_to(cache.resolve())
    assert "/" not in only.label.name and ".." not in only.label.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "outside.jpg"]
    outside = [i for i in ds.issues if i.kind == "outside_dataset"]  # and the report says so
    assert [i.action for i in outside] == ["skipped", "skipped"]
    assert "'../outside.jpg' is outside the dataset folder" in outside[0].detail


def test_coco_unknown_categories_and_bad_boxes_are_dropped_and_reported(
    tmp_path: Path, write_jpeg: Callable[..., Path]
) -> None:
    write_jpeg(tmp_path / "images" / "a.jpg", size=16)
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 16, "height": 16}],
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 8]},
            {"id": 11, "image_id": 1, "category_id": 99, "bbox": [8, 8, 4, 4]},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [1, 2, "x", 4]},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    ds = load_dataset(tmp_path / "c.json", cache_dir=tmp_path / "cache")
    (a,) = ds.samples
    assert a.label.read_text() == "0 0.250000 0.250000 0.500000 0.500000\n"  # the car stays
    unknown, bad = ds.issues
    assert unknown.kind == "unknown_category" and unknown.action == "skipped"
    assert "annotation 11 of image 1: category_id 99 is not in categories" in unknown.detail
    assert bad.kind == "bad_value" and "annotation 12" in bad.detail

    from fl_server.data import check_dataset

    report = check_dataset(ds)  # the loading findings are in the data check's report
    assert report.counts["unknown_category"] == 1 and report.counts["bad_value"] == 1
    assert "category_id 99" in report.summary()


@pytest.mark.parametrize(
    ("declared", "issue"),
    [
        ((80, 40), ("exif_rotated", "repaired")),  # boxes drawn on the stored 80x40 pixels
        ((40, 80), ("exif_rotated", "kept")),  # boxes drawn on the image as shown, 40x80
        ((None, None), ("exif_rotated", "kept")),
        ((100, 30), ("bad_value", "skipped")),  # neither shape: the boxes cannot be placed
    ],
)
def test_coco_boxes_follow_the_exif_orientation(tmp_path: Path, declared, issue) -> None:
    import cv2
    import numpy as np
    from PIL import Image

    stored = np.zeros((40, 80, 3), np.uint8)  # 80 wide, 40 high; a white car at x 16..32, y 8..16
    stored[8:16, 16:32] = 255
    image = tmp_path / "images" / "r.jpg"
    image.parent.mkdir(parents=True)
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(stored).save(image, "JPEG", quality=95, exif=exif.tobytes())
    shown = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)  # what Ultralytics trains on
    assert shown.shape == (80, 40)
    ys, xs = np.nonzero(shown > 128)
    car = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]  # in shown px

    entry = {"id": 1, "file_name": "r.jpg"}
    if declared[0]:
        entry |= {"width": declared[0], "height": declared[1]}
    box = [16, 8, 16, 8] if declared == (80, 40) else [int(v) for v in car]
    coco = {
        "images": [entry],
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    ds = load_dataset(tmp_path / "c.json", cache_dir=tmp_path / "cache")
    assert [(i.kind, i.action) for i in ds.issues] == [issue]
    if issue[1] == "skipped":
        assert ds.samples == []
        return
    (sample,) = ds.samples
    cx, cy, w, h = (float(v) for v in sample.label.read_text().split()[1:])
    label_px = [(cx - w / 2) * 40, (cy - h / 2) * 80, w * 40, h * 80]
    assert label_px == pytest.approx(car, abs=1.0)  # the label sits on the car OpenCV shows


def test_coco_boxes_of_an_image_only_opencv_reads_are_kept(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    image = tmp_path / "images" / "depth.pfm"  # Pillow cannot open PFM; OpenCV (training) can
    image.parent.mkdir()
    assert cv2.imwrite(str(image), np.zeros((20, 40, 3), np.float32))
    coco = {
        "images": [{"id": 1, "file_name": "depth.pfm"}],  # no width/height given
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10]}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    (sample,) = load_dataset(tmp_path / "c.json", cache_dir=tmp_path / "cache").samples
    assert sample.label is not None  # not silently a background image
    assert sample.label.read_text() == "0 0.500000 0.500000 0.500000 0.500000\n"


def test_nc_that_disagrees_with_names_names_both(tmp_path: Path, write_jpeg) -> None:
    write_jpeg(tmp_path / "images" / "a.jpg", size=16)
    _write_yaml(tmp_path / "data.yaml", {"nc": 3, "names": ["car", "bus"], "train": "images"})
    with pytest.raises(DataError, match=r"nc is 3 but names lists 2 classes \(car, bus\)"):
        load_dataset(tmp_path / "data.yaml")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p / "missing", "not found"),
        (lambda p: p, "no data.yaml"),
        (lambda p: _touch(p / "x.csv", "a,b"), "unsupported file type"),
        (lambda p: _touch(p / "data.yaml", "train: images\n"), "names"),
        (lambda p: _touch(p / "data.yaml", "names: [a]\ntrain: nowhere\nval: nowhere\n"), "train"),
        (lambda p: _touch(p / "data.yaml", "- just\n- a list\n"), "mapping"),
        (lambda p: _touch(p / "c.json", "{not json"), "cannot read JSON"),
        (lambda p: _touch(p / "c.json", '{"images": []}'), "not a COCO"),
    ],
)
def test_bad_paths_raise_one_clear_line(
    tmp_path: Path, make: Callable[[Path], Path], words: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError, match=words) as err:
        load_dataset(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message


def _touch(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
