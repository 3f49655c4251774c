"""FedAvg (Flower's) over fedyolo's wire format."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fl_client.model import build_model, load_record, to_record

NAMES = ["car", "pedestrian"]


def _aggregate(models_and_counts):
    """What FedAvg.aggregate_train does with the valid replies' contents."""
    contents = [
        RecordDict({"arrays": to_record(m), "metrics": MetricRecord({"num-examples": n})})
        for m, n in models_and_counts
    ]
    return aggregate_arrayrecords(contents, "num-examples")


def test_fedavg_of_identical_models_is_that_model():
    model = build_model("fedyolo-tiny.yaml", NAMES)
    arrays = _aggregate([(model, 10), (model, 30), (model, 7)])
    out = build_model("fedyolo-tiny.yaml", NAMES)
    load_record(out, arrays)
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(out.state_dict()[k], v, rtol=0, atol=1e-6), k


def test_fedavg_weights_by_num_examples():
    a, b = build_model("fedyolo-tiny.yaml", NAMES), build_model("fedyolo-tiny.yaml", NAMES)
    arrays = _aggregate([(a, 30), (b, 10)])
    key = next(iter(arrays.keys()))
    expected = 0.75 * to_record(a)[key].numpy() + 0.25 * to_record(b)[key].numpy()
    np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
