"""The one label-line parser and the one data.yaml reader, as their users see them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fl_client import faults
from fl_client.client_app import shard_yaml
from fl_client.data import DataError, LabelLineError, parse_line, read_data_yaml
from fl_client.data.formats import label_path_for
from fl_client.data.labels import read_lines


def test_a_box_line_and_a_polygon_line_parse_to_boxes():
    line = parse_line("2 0.5 0.5 0.2 0.4")
    assert (line.cls, line.box, line.polygon_points) == (2, (0.5, 0.5, 0.2, 0.4), 0)
    poly = parse_line("1 0.1 0.2 0.3 0.2 0.3 0.6")
    assert poly.polygon_points == 3
    assert poly.box == pytest.approx((0.2, 0.4, 0.2, 0.4))
    assert line.class_in(3) and not line.class_in(2) and not parse_line("1.5 0 0 1 1").class_in(3)
    assert line.format(cls=0) == "0 0.500000 0.500000 0.200000 0.400000"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("0 0.5 0.5 0.2", "bad_columns"),
        ("0 0.5 0.5 0.2 0.2 0.1", "bad_columns"),
        ("0 0.5 nan 0.2 0.2", "bad_value"),
        ("0 0.5 inf 0.2 0.2", "bad_value"),
        ("car 0.5 0.5 0.2 0.2", "bad_value"),
    ],
)
def test_a_bad_line_raises_the_issue_kind_the_checker_reports(text, kind):
    with pytest.raises(LabelLineError) as err:
        parse_line(text)
    assert err.value.kind == kind


def test_read_lines_skips_blank_lines_and_yields_errors_in_place(tmp_path):
    label = tmp_path / "a.txt"
    label.write_text("0 0.5 0.5 0.2 0.2\n\n   \nbroken\n")
    out = list(read_lines(label))
    assert len(out) == 2 and isinstance(out[1], LabelLineError)
    assert list(read_lines(tmp_path / "missing.txt")) == []  # no file: a background image


def test_data_yaml_reader_names_a_missing_split(tmp_path):
    (tmp_path / "data.yaml").write_text(
        yaml.safe_dump({"train": "images/train", "val": "nowhere", "names": ["a"]})
    )
    (tmp_path / "images" / "train").mkdir(parents=True)
    spec = read_data_yaml(tmp_path / "data.yaml")
    assert spec.names == ["a"] and spec.images("train") == [] and spec.images("test") == []
    with pytest.raises(DataError, match="val entry 'nowhere' not found"):
        spec.images("val")


def test_flipped_label_shard_shifts_every_class_and_keeps_val(shards, tmp_path):
    data_yaml = shards["day"]
    spec = read_data_yaml(data_yaml)
    nc = len(spec.names)
    flipped = read_data_yaml(faults.flipped_label_shard(data_yaml, tmp_path / "flipped", nc))
    originals = {p.name: p for p in spec.images("train")}
    assert sorted(p.name for p in flipped.images("train")) == sorted(originals)
    flips = 0
    for image in flipped.images("train"):
        before = [x.cls for x in read_lines(label_path_for(originals[image.name]))]
        after = [x.cls for x in read_lines(label_path_for(image))]
        assert after == [(c + 1) % nc for c in before]
        flips += len(after)
    assert flips > 0
    assert flipped.images("val") == spec.images("val")


def test_a_client_whose_classes_differ_from_the_federation_fails_with_both_lists(shards):
    data_yaml = shards["day"]
    names = tuple(read_data_yaml(data_yaml).names)
    node = {"data-path": str(data_yaml)}
    assert shard_yaml(node, SimpleNamespace(names=names, data_root="")) == data_yaml
    with pytest.raises(ValueError, match="has classes .* the federation trains"):
        shard_yaml(node, SimpleNamespace(names=names[::-1], data_root=""))


def test_shard_yaml_names_a_missing_file(tmp_path: Path):
    node = {"data-path": str(tmp_path / "none.yaml")}
    with pytest.raises(FileNotFoundError, match="none.yaml"):
        shard_yaml(node, SimpleNamespace(names=("a",), data_root=""))
