"""The model and the weights on the wire."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fl_client.model import (
    ModelConfigError,
    build_model,
    exchanged_keys,
    layout,
    load_record,
    part_masks,
    save_checkpoint,
    to_record,
    unpack,
)

NAMES = ["car", "pedestrian", "cyclist"]


def test_head_has_dataset_class_count_from_the_start():
    model = build_model("fedyolo-tiny.yaml", NAMES)
    assert model.yaml["nc"] == 3
    assert model.names == {0: "car", 1: "pedestrian", 2: "cyclist"}
    # The classification convs of the head output nc channels.
    cls_out = [
        m
        for n, m in model.named_modules()
        if n.startswith("model.22.cv3") and isinstance(m, torch.nn.Conv2d)
    ]
    assert cls_out and cls_out[-1].out_channels == 3


def test_round_trip_is_exact_and_covers_params_and_bn_stats():
    src = build_model("fedyolo-tiny.yaml", NAMES)
    with torch.no_grad():  # make BN statistics non-default so a skipped buffer would show
        for _name, buf in src.named_buffers():
            if buf.dtype.is_floating_point:
                buf.copy_(torch.rand_like(buf) + 0.5)
    rec = to_record(src)
    assert list(rec.keys()) == ["weights"]  # one packed vector: few objects on the wire
    assert rec["weights"].numpy().dtype == np.float32
    views = unpack(rec, layout(src))
    keys = set(views)
    assert any(k.endswith(".bn.running_mean") for k in keys)
    assert any(k.endswith(".bn.running_var") for k in keys)
    assert not any(k.endswith("num_batches_tracked") for k in keys)
    for k, v in views.items():
        assert np.array_equal(v, src.state_dict()[k].numpy()), k
    dst = build_model("fedyolo-tiny.yaml", NAMES)
    load_record(dst, rec)
    s, d = src.state_dict(), dst.state_dict()
    for k in exchanged_keys(src):
        assert torch.equal(s[k], d[k]), k
    # 1-D tensors (biases, BN weights) travel too, not only conv kernels.
    assert any(s[k].ndim == 1 for k in exchanged_keys(src))


def test_bn_mean_and_var_masks_pair_channel_by_channel():
    """The i-th running mean and the i-th running variance of the packed vector belong to the
    same channel (strategies.guarded pools the variances with this pairing)."""
    model = build_model("fedyolo-tiny.yaml", NAMES)
    channel = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                ids = torch.arange(channel, channel + m.num_features, dtype=torch.float32)
                m.running_mean.copy_(ids)
                m.running_var.copy_(ids)
                channel += m.num_features
    flat = to_record(model)["weights"].numpy()
    masks = part_masks(model)
    assert masks["bn_mean"].sum() == masks["bn_var"].sum() == channel > 0
    np.testing.assert_array_equal(flat[masks["bn_mean"]], flat[masks["bn_var"]])
    np.testing.assert_array_equal(masks["bn_mean"] | masks["bn_var"], masks["bn_stats"])


def test_load_record_refuses_a_mismatched_model():
    rec = to_record(build_model("fedyolo-tiny.yaml", NAMES + ["sign"]))
    with pytest.raises(ValueError, match="the model has"):
        load_record(build_model("fedyolo-tiny.yaml", NAMES), rec)


def test_unknown_model_cfg_is_one_clear_error():
    with pytest.raises(ModelConfigError, match="model.cfg"):
        build_model("yolov99z.yaml", NAMES)


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def test_ultralytics_families_build_for_the_class_count_and_round_trip(cfg):
    model = build_model(cfg, NAMES)
    assert model.yaml["nc"] == 3
    twin = build_model(cfg, NAMES)
    load_record(twin, to_record(model))
    for k in exchanged_keys(model):
        assert torch.equal(twin.state_dict()[k], model.state_dict()[k]), k


def test_fine_tuning_from_a_checkpoint_of_another_class_count(tmp_path):
    from fl_client.model import save_checkpoint

    coco = build_model("fedyolo-tiny.yaml", [f"c{i}" for i in range(80)])
    ckpt = save_checkpoint(coco, tmp_path / "coco.pt", {"imgsz": 64}, {})
    model = build_model(str(ckpt), NAMES)
    assert model.yaml["nc"] == 3
    src, dst = coco.state_dict(), model.state_dict()
    kept = [k for k in dst if k in src and src[k].shape == dst[k].shape]
    assert all(torch.equal(src[k], dst[k]) for k in kept if "model.22" not in k)
    # Everything but the class-specific head convs comes from the checkpoint.
    assert len(kept) >= len(dst) - 6


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Boom(tmp_path / "pwned")}, evil)
    with pytest.raises(ModelConfigError, match="evil.pt"):
        build_model(str(evil), ["car"])
    assert not (tmp_path / "pwned").exists()


def test_a_client_builds_from_the_architecture_it_is_sent_and_fedyolo_checkpoints_load(tmp_path):
    model = build_model("fedyolo-tiny.yaml", ["car", "bus"])
    path = save_checkpoint(model, tmp_path / "best.pt", {}, {"round": 1})
    again = build_model(str(path), ["car", "bus"])  # weights-only loading accepts our own files
    sent = build_model(json.loads(json.dumps(model.yaml)), ["car", "bus"])
    for built in (again, sent):
        assert list(built.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(again.state_dict(), model.state_dict())
