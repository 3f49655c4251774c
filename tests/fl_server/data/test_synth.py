"""The synthetic generator: determinism, valid labels, class coverage, domain effects."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from fl_server.data import CLASSES, DOMAINS, DataError, generate


def _files(root: Path) -> dict[str, bytes]:
    """Every generated file except data.yaml (which records the absolute output path)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "data.yaml"
    }


def _labels(root: Path) -> dict[str, list[list[float]]]:
    return {
        p.stem: [[float(v) for v in line.split()] for line in p.read_text().splitlines()]
        for p in sorted((root / "labels").glob("*.txt"))
    }


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", 12, seed=7, domains=DOMAINS).parent
    b = generate(tmp_path / "b", 12, seed=7, domains=DOMAINS).parent
    c = generate(tmp_path / "c", 12, seed=8, domains=DOMAINS).parent
    files_a, files_c = _files(a), _files(c)
    assert len(files_a) == 12 * 2 + 1
    assert files_a == _files(b)
    changed = [k for k in files_a if k.startswith("images/") and files_a[k] != files_c[k]]
    assert len(changed) == 12


def test_image_depends_only_on_seed_and_index(tmp_path: Path) -> None:
    small = _files(generate(tmp_path / "small", 3, seed=5).parent)
    big = _files(generate(tmp_path / "big", 6, seed=5).parent)
    for name, data in small.items():
        if name != "meta.jsonl":
            assert big[name] == data, name


def test_rerun_replaces_previous_synthetic_output(tmp_path: Path) -> None:
    generate(tmp_path / "s", 6, seed=1)
    generate(tmp_path / "s", 3, seed=1)
    assert len(list((tmp_path / "s" / "images").iterdir())) == 3
    assert len(list((tmp_path / "s" / "labels").iterdir())) == 3


def test_refuses_a_folder_holding_foreign_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.jpg").write_bytes(b"user data")
    with pytest.raises(DataError, match="not synthetic"):
        generate(tmp_path, 2)
    assert (tmp_path / "images" / "mine.jpg").read_bytes() == b"user data"


def test_labels_are_valid_yolo_with_scale_variety(synth_yaml: Path) -> None:
    root = synth_yaml.parent
    labels = _labels(root)
    assert set(labels) == {p.stem for p in (root / "images").glob("*.jpg")}
    assert len(labels) == 64
    min_side = 6 / 128 - 1e-6
    heights = []
    for rows in labels.values():
        for cls, cx, cy, w, h in rows:
            assert cls == int(cls) and 0 <= cls < len(CLASSES)
            assert cx - w / 2 >= -1e-6 and cx + w / 2 <= 1 + 1e-6  # 6-decimal rounding
            assert cy - h / 2 >= -1e-6 and cy + h / 2 <= 1 + 1e-6
            assert w >= min_side and h >= min_side
            heights.append(h)
    assert max(heights) / min(heights) > 4  # far objects small, near ones large
    assert sum(len(rows) for rows in labels.values()) >= 64 * 2


def test_every_class_appears_in_64_images(synth_yaml: Path) -> None:
    images_with = Counter()
    for rows in _labels(synth_yaml.parent).values():
        images_with.update({int(r[0]) for r in rows})
    assert all(images_with[c] >= 5 for c in range(len(CLASSES))), images_with


def test_meta_and_data_yaml(synth_yaml: Path) -> None:
    root = synth_yaml.parent
    meta = [json.loads(line) for line in (root / "meta.jsonl").read_text().splitlines()]
    assert [m["image"] for m in meta] == [f"images/{i:06d}.jpg" for i in range(64)]
    assert [m["domain"] for m in meta[:5]] == ["day", "night", "fog", "rain", "day"]
    assert [m["class_mix"] for m in meta[:4]] == ["urban", "highway", "urban", "highway"]
    data = yaml.safe_load(synth_yaml.read_text())
    assert data["path"] == str(root.resolve())
    assert (data["train"], data["val"], data["nc"]) == ("images", "images", 4)
    assert data["names"] == dict(enumerate(CLASSES))


def test_class_mix_changes_class_balance(tmp_path: Path) -> None:
    def fractions(mix: str) -> dict[int, float]:
        rows = _labels(generate(tmp_path / mix, 40, seed=3, class_mix=mix).parent).values()
        counts = Counter(int(r[0]) for image in rows for r in image)
        return {c: counts[c] / sum(counts.values()) for c in range(len(CLASSES))}

    urban, highway = fractions("urban"), fractions("highway")
    assert highway[0] > 0.6 and highway[0] > urban[0] + 0.2
    assert urban[1] + urban[2] > highway[1] + highway[2] + 0.2


def _stats(root: Path) -> dict[str, float]:
    imgs = [cv2.imread(str(p)) for p in sorted((root / "images").glob("*.jpg"))]
    grey = [cv2.cvtColor(i, cv2.COLOR_BGR2GRAY) for i in imgs]
    return {
        "mean": float(np.mean([g.mean() for g in grey])),
        "std": float(np.mean([g.std() for g in grey])),
        "sharp": float(np.mean([cv2.Laplacian(g, cv2.CV_64F).var() for g in grey])),
        "warm": float(np.mean([i[..., 2].mean() - i[..., 0].mean() for i in imgs])),
    }


def test_domains_change_image_statistics_as_intended(tmp_path: Path) -> None:
    """Same seed, same scenes; only the domain differs."""
    s = {d: _stats(generate(tmp_path / d, 12, seed=11, domains=(d,)).parent) for d in DOMAINS}
    day = s["day"]
    assert s["night"]["mean"] < 0.5 * day["mean"]
    assert s["night"]["std"] < day["std"]
    assert s["dusk"]["mean"] < 0.85 * day["mean"]
    assert s["dusk"]["warm"] > day["warm"] + 15  # orange: red up relative to blue
    assert s["fog"]["std"] < 0.75 * day["std"]
    assert s["rain"]["sharp"] > 1.5 * day["sharp"]
    assert s["blur"]["sharp"] < 0.5 * day["sharp"]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"num_images": 0}, "num_images"),
        ({"imgsz": 16}, "imgsz"),
        ({"seed": -1}, "seed"),
        ({"domains": ("snow",)}, "domain"),
        ({"domains": ()}, "domains"),
        ({"class_mix": "rural"}, "class_mix"),
    ],
)
def test_bad_arguments_raise_one_line(tmp_path: Path, kwargs: dict, words: str) -> None:
    args = {"num_images": 2, **kwargs}
    with pytest.raises(DataError, match=words) as err:
        generate(tmp_path / "x", **args)
    assert "\n" not in str(err.value)


def test_scene_geometry_does_not_depend_on_domain(tmp_path: Path) -> None:
    day = _files(generate(tmp_path / "day", 6, seed=2, domains=("day",)).parent)
    night = _files(generate(tmp_path / "night", 6, seed=2, domains=("night",)).parent)
    labels = [k for k in day if k.startswith("labels/")]
    assert labels and all(day[k] == night[k] for k in labels)


def _hidden_fraction(box: list[float], nearer: list[list[float]], size: int = 128) -> float:
    """Share of a box covered by the union of nearer (lower-bottom-edge) boxes, in pixels."""

    def pixels(b: list[float]) -> tuple[int, int, int, int]:
        _, cx, cy, w, h = b
        return tuple(round(v * size) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))

    covered = np.zeros((size, size), bool)
    for other in nearer:
        x1, y1, x2, y2 = pixels(other)
        covered[y1:y2, x1:x2] = True
    x1, y1, x2, y2 = pixels(box)
    return covered[y1:y2, x1:x2].mean()


def test_objects_overlap_but_none_is_mostly_hidden(synth_yaml: Path) -> None:
    fractions = []
    for rows in _labels(synth_yaml.parent).values():
        for box in rows:
            bottom = box[2] + box[4] / 2
            nearer = [o for o in rows if o[2] + o[4] / 2 > bottom + 1e-6]
            fractions.append(_hidden_fraction(box, nearer))
    assert max(fractions) <= 0.75  # 0.7 plus pixel rounding
    assert sum(f > 0.1 for f in fractions) >= 10  # partial occlusion does happen
