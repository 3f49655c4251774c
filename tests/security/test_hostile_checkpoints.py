"""A checkpoint never runs code, whichever command loads it (issue 28, item 2).

Two crafted ``.pt`` files: one whose pickle calls ``os.system`` (a full unpickle runs it), and a
genuine, weights-only checkpoint whose architecture's ``activation`` string is Python
(Ultralytics ``eval``-s it when it builds the model). Every command that takes a checkpoint is
run on them in this process: the marker file the code would create never appears, and the
command ends with one line naming the file (exit 2), not a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit import TINY_BASE  # noqa: E402

from fl_client.model import ModelConfigError, build_model, save_checkpoint  # noqa: E402
from fl_server.cli import main  # noqa: E402

NAMES = ["car", "pedestrian", "cyclist", "traffic_sign"]  # the synthetic set's classes


class _Payload:
    """Unpickled in full, runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def pickled_code(tmp_path) -> tuple[Path, Path]:
    """A ``.pt`` whose pickle runs a command; the marker that command would create."""
    marker = tmp_path / "pwned-by-pickle"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker), "train_args": {"imgsz": 64}}, evil)
    return evil, marker


@pytest.fixture
def code_in_architecture(tmp_path) -> tuple[Path, Path]:
    """A weights-only checkpoint whose model yaml's ``activation`` is code; its marker."""
    marker = tmp_path / "pwned-by-yaml"
    model = build_model("fedyolo-tiny.yaml", NAMES)
    model.yaml["activation"] = f"__import__('os').system('touch {marker}') or nn.SiLU()"
    return save_checkpoint(model, tmp_path / "sneaky.pt", {"imgsz": 64}, {}), marker


def _one_line_naming(capsys, path: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    assert path.name in err and "fedyolo: error:" in err, err
    return err


def _refused(capsys, path: Path) -> None:
    err = _one_line_naming(capsys, path)
    assert "refused to unpickle code" in err and "posix.system" in err, err


def test_export_refuses_a_checkpoint_that_runs_code(pickled_code, tmp_path, capsys):
    evil, marker = pickled_code
    assert main(["export", str(evil), f"out={tmp_path / 'bundle'}"]) == 2
    _refused(capsys, evil)
    assert not marker.exists()


def test_export_check_refuses_the_checkpoint_model_json_names(pickled_code, tmp_path, capsys):
    evil, marker = pickled_code
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"")
    meta = {
        "file": "model.onnx",
        "format": "onnx",
        "precision": "fp32",
        "imgsz": [64, 64],
        "sha256": "0" * 64,
        "heldout_data": None,
        "source": {"checkpoint": str(evil), "checkpoint_sha256": "0" * 64},
        "gates": {"passed": True},
    }
    (bundle / "model.json").write_text(json.dumps(meta))
    assert main(["export", str(bundle), "--check"]) == 2
    _refused(capsys, evil)
    assert not marker.exists()


def test_bench_refuses_a_checkpoint_that_runs_code(pickled_code, tmp_path, capsys):
    evil, marker = pickled_code
    assert main(["bench", str(evil), f"out={tmp_path / 'bench'}", "imgsz=[64]"]) == 2
    _refused(capsys, evil)
    assert not marker.exists()


def test_evaluate_refuses_a_checkpoint_that_runs_code(pickled_code, tmp_path):
    from fl_client.evaluate import evaluate_checkpoint

    evil, marker = pickled_code
    with pytest.raises(ModelConfigError, match=r"evaluate: .*evil\.pt .*refused to unpickle"):
        evaluate_checkpoint(
            evil, tmp_path / "data.yaml", imgsz=64, batch=1, device="cpu", workdir=tmp_path
        )
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".PT", ".pth", ".torchscript", ".bin"])
def test_evaluate_runs_no_pickle_under_another_suffix(pickled_code, tmp_path, suffix):
    """Only ``.pt`` takes the weights-only loader by name; any other suffix goes to
    ``YOLO(path)`` with Ultralytics' safe load switched on: the pickle is refused or not read
    as one, and its code never runs."""
    from fl_client.evaluate import evaluate_checkpoint

    evil, marker = pickled_code
    renamed = evil.rename(evil.with_suffix(suffix))
    with pytest.raises(Exception):  # noqa: B017 - refused: by name, format or unpickler
        evaluate_checkpoint(
            renamed, tmp_path / "data.yaml", imgsz=64, batch=1, device="cpu", workdir=tmp_path
        )
    assert not marker.exists()


@pytest.mark.parametrize("crafted", ["pickled_code", "code_in_architecture"])
def test_run_refuses_a_model_cfg_that_runs_code(crafted, tmp_path, capsys, request):
    evil, marker = request.getfixturevalue(crafted)
    out = tmp_path / "runs"
    assert main(["run", f"model.cfg={evil}", f"output.dir={out}"]) == 2
    err = _one_line_naming(capsys, evil)
    assert "model.cfg" in err
    assert not marker.exists()
    assert not out.exists()  # stopped with the configuration, before any work


@pytest.mark.parametrize("crafted", ["pickled_code", "code_in_architecture"])
def test_run_refuses_a_distill_teacher_that_runs_code(crafted, tmp_path, capsys, request):
    evil, marker = request.getfixturevalue(crafted)
    args = [
        *TINY_BASE,
        "federation.rounds=1",
        "federation.clients=2",
        "data.synth.images=24",
        f"output.dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'synth-cache'}",
        "tracking.enabled=false",
        f"distill.teacher={evil}",
    ]
    assert main(["run", *args]) == 2
    err = _one_line_naming(capsys, evil)
    assert "distill.teacher" in err
    assert not marker.exists()


def test_a_fedyolo_checkpoint_loads_weights_only_and_exports(tmp_path):
    """The loader accepts what fedyolo writes, and its YOLO predicts and exports as usual."""
    import numpy as np

    from fl_client.ultralytics_adapter import load_checkpoint, load_yolo

    model = build_model("fedyolo-tiny.yaml", NAMES)
    path = save_checkpoint(model, tmp_path / "best.pt", {"imgsz": 64}, {"round": 3})
    weights, ckpt = load_checkpoint(path, "test")
    assert ckpt["fedyolo"] == {"round": 3}
    torch.testing.assert_close(weights.state_dict(), model.float().state_dict())
    yolo = load_yolo(path, "test")
    assert yolo.task == "detect" and yolo.names == dict(enumerate(NAMES))
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    assert len(yolo.predict(image, imgsz=64, verbose=False, device="cpu")) == 1
    onnx = yolo.export(format="onnx", imgsz=64, simplify=False, device="cpu")
    assert Path(onnx).is_file()
