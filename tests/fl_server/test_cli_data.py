"""`fedyolo data synth | partition | check` through the command line."""

from __future__ import annotations

import json

from fl_server.cli import main


def test_synth_partition_check(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "synth",
                str(tmp_path / "ds"),
                "--images",
                "30",
                "--imgsz",
                "64",
                "--domains",
                "day,night",
            ]
        )
        == 0
    )
    data_yaml = tmp_path / "ds" / "data.yaml"
    assert data_yaml.is_file()
    assert main(["data", "check", str(data_yaml)]) == 0  # clean data: exit 0

    assert (
        main(
            [
                "data",
                "partition",
                str(data_yaml),
                str(tmp_path / "parts"),
                "--clients",
                "2",
                "--method",
                "domain",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert [len(c["domains"]) for c in manifest["clients"]] == [1, 1]
    assert (tmp_path / "parts" / "client_1" / "data.yaml").is_file()

    label = sorted((tmp_path / "ds" / "labels").glob("*.txt"))[0]
    label.write_text("0 1.7 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n")
    capsys.readouterr()
    report = tmp_path / "bad.json"
    assert main(["data", "check", str(data_yaml), "--report", str(report)]) == 3
    kinds = {i["kind"] for i in json.loads(report.read_text())["issues"]}
    assert {"class_out_of_range"} <= kinds and ({"out_of_bounds"} & kinds)
    assert label.name in capsys.readouterr().out or label.name in report.read_text()


def test_missing_dataset_is_one_line(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedyolo: error:") and "\n" not in err
