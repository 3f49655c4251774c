"""Config composition and validation: a bad value is one line naming the key."""

from __future__ import annotations

import pytest

from fl_server.cli import main
from fl_server.config import ConfigError, compose


def test_defaults_compose_and_overrides_apply():
    cfg = compose(["federation.clients=4", "data.partition=dirichlet", "data.alpha=0.3"])
    assert cfg.federation.clients == 4
    assert cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.3
    assert cfg.engine.name == "simulation" and cfg.strategy.name == "fedavg"
    assert compose(["engine=local-deployment"]).engine.name == "local-deployment"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.clients=0", "federation.clients"),
        ("federation.rounds=-1", "federation.rounds"),
        ("train.epochs=zero", "train.epochs"),
        ("train.imgsz=100", "train.imgsz"),
        ("train.lr0=0", "train.lr0"),
        ("train.optimizer=auto", "train.optimizer"),
        ("train.device=gpu", "train.device"),
        ("data.partition=random", "data.partition"),
        ("data.alpha=0", "data.alpha"),
        ("strategy.name=nope", "strategy.name"),
        ("model.cfg=yolov99z.yaml", "model.cfg"),
        ("data.path=/does/not/exist", "data.path"),
        ("federation.nope=1", "federation.nope"),
        ("name=victim'x", "name"),
        ("name=../escape", "name"),
        ("name=a/b", "name"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as exc:
        compose([override])
    assert key in str(exc.value)


def test_cli_prints_one_line_and_exits_2(capsys, tmp_path):
    rc = main(["run", "federation.clients=0", f"output.dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "federation.clients=0" in err
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_a_run_from_before_newer_checks_resumes_as_it_ran(tmp_path):
    """A run directory whose config predates the per-step norm rule and the guard's significance
    test resumes with both off (as it ran), not with an error about a missing key."""
    import numpy as np
    from omegaconf import OmegaConf

    from fl_server import state
    from fl_server.config import to_yaml

    cfg = OmegaConf.create(OmegaConf.to_container(compose([])))  # as read back from a file
    del cfg["config_version"]  # written before configs had a version: version 0
    del cfg.aggregation["max_step_norm_x_median"]
    del cfg.guard["significance"], cfg.guard["bootstrap"]
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    w = np.zeros(3, np.float32)
    state.save(
        tmp_path / state.FILENAME, {"round": 1, "weights": w, "strategy": None, "best": (w, None)}
    )
    resumed = compose([f"resume={tmp_path}"])
    assert resumed.aggregation.max_step_norm_x_median is None
    assert resumed.guard.significance is None and resumed.guard.bootstrap == 200
    fresh = compose([])
    assert fresh.aggregation.max_step_norm_x_median == 3.0 and fresh.guard.significance == 0.05
    with pytest.raises(ConfigError, match="guard.significance"):
        compose(["guard.significance=0.7"])
