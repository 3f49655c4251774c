"""The server's learning-rate schedule across rounds follows Ultralytics' own over its epochs."""

from __future__ import annotations

import pytest
from ultralytics.utils.torch_utils import one_cycle

from fl_server.config import ConfigError, compose
from fl_server.lr_schedule import SCHEDULES, factor, round_rates


def _federated_epochs(schedule: str, rounds: int, epochs: int, lrf: float) -> list[float]:
    """Each local epoch's learning rate / lr0, as a client's Ultralytics trainer sets it: the
    round's start times its own linear lf over the round's epochs (ultralytics/engine/trainer.py
    ``_setup_scheduler``)."""
    out = []
    for rnd in range(1, rounds + 1):
        start, end = round_rates(schedule, rnd, rounds, epochs, lrf)
        out += [start * (max(1 - e / epochs, 0) * (1.0 - end) + end) for e in range(epochs)]
    return out


@pytest.mark.parametrize("rounds,epochs", [(12, 2), (5, 3), (8, 1)])
def test_linear_is_ultralytics_linear_over_all_epochs(rounds, epochs):
    lrf, total = 0.01, rounds * epochs
    central = [max(1 - g / total, 0) * (1.0 - lrf) + lrf for g in range(total)]
    assert _federated_epochs("linear", rounds, epochs, lrf) == pytest.approx(central, abs=1e-12)


def test_cos_meets_ultralytics_cosine_at_every_round_start():
    rounds, epochs, lrf = 6, 3, 0.05
    cos = one_cycle(1, lrf, rounds * epochs)  # Ultralytics' cos_lr curve
    rates = _federated_epochs("cos", rounds, epochs, lrf)
    for rnd in range(rounds):
        assert rates[rnd * epochs] == pytest.approx(cos(rnd * epochs), abs=1e-12)
    # between round starts the chord stays close to the cosine (below it, then above it)
    assert max(abs(r - cos(g)) for g, r in enumerate(rates)) < 0.05


def test_constant_keeps_lr0_and_the_decays_only_go_down():
    assert _federated_epochs("constant", 4, 2, 0.01) == [1.0] * 8
    for schedule in ("linear", "cos"):
        rates = _federated_epochs(schedule, 10, 2, 0.01)
        assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
        assert rates[0] == 1.0 and factor(schedule, 20, 20, 0.01) == pytest.approx(0.01)


@pytest.mark.parametrize("bad", ["train.lr_schedule=step", "train.lrf=0", "train.lrf=1.5"])
def test_a_bad_schedule_is_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        compose([bad])


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_schema_accepts_every_schedule_the_server_knows(name):
    """The schema lists the names itself (it is fl_server's floor: it cannot import
    lr_schedule); this keeps the two lists the same."""
    assert compose([f"train.lr_schedule={name}"]).train.lr_schedule == name
