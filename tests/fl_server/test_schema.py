"""The config's schema, its migration and its one override grammar (issue 29, item 4).

Defaults live once (the YAML files), types and ranges once (``fl_server.schema``); an old run's
``config.yaml`` is migrated as it ran; ``key=value`` means the same for a fresh run, a resumed
one and ``fedyolo distill``'s ``from_run``.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass

import numpy as np
import pytest
from omegaconf import OmegaConf

from fl_server import schema, state
from fl_server.config import (
    ConfigError,
    compose,
    compose_settings,
    from_run,
    migrate,
    to_yaml,
    validate,
)
from fl_server.guard import Guard
from fl_server.schema import Checked

# what a version-0 run (before config_version) lacked, and the value it resumes with
VERSION_0 = {
    "aggregation.max_step_norm_x_median": None,
    "guard.significance": None,
    "guard.bootstrap": 200,
    "guard.contribution": False,
    "guard.min_flag_gain": 0.01,
    "guard.flag_agreement": None,
    "guard.patience": 0,
    "guard.severe_drop": 0.5,
    "output.save_matches": False,
    "guard.contribution_sample": 0,  # version 1 lacked it too (every client was scored)
    "train.lr_schedule": "constant",  # version 3 lacked it (a constant rate)
    "train.lrf": 0.01,
    "train.keep_momentum": False,  # version 4 lacked it (every round's optimiser started at 0)
}


def _old_run(tmp_path, overrides=()):
    """A run directory as an older fedyolo left it: no config_version, none of the later keys."""
    cfg = OmegaConf.create(OmegaConf.to_container(compose(list(overrides))))
    del cfg["config_version"], cfg["hooks"], cfg["distill"]
    for key in VERSION_0:
        group, name = key.split(".")
        del cfg[group][name]
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    w = np.zeros(3, np.float32)
    state.save(
        tmp_path / state.FILENAME, {"round": 1, "weights": w, "strategy": None, "best": (w, None)}
    )
    return tmp_path


def test_an_old_config_migrates_to_the_values_it_ran_with_and_validates(tmp_path):
    old = OmegaConf.load(_old_run(tmp_path) / "config.yaml")
    assert "config_version" not in old
    cfg = migrate(old)
    assert cfg.config_version == schema.CONFIG_VERSION
    for key, value in VERSION_0.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.hooks == [] and cfg.distill == {"teacher": None, "weight": 6.0}
    validate(cfg)  # the whole schema, the engine's keys, the strategy
    assert migrate(cfg) == cfg  # a current config is left as it is
    fresh = compose([])
    assert fresh.config_version == schema.CONFIG_VERSION
    assert f"config_version: {schema.CONFIG_VERSION}" in to_yaml(fresh)  # in every new config.yaml
    assert fresh.guard.bootstrap == 200 and fresh.guard.patience == 1  # the YAML's, not 0


def test_a_version_1_config_scores_every_client_as_it_ran():
    """``guard.contribution_sample`` came with version 2: a version-1 run resumes scoring every
    client (0), a fresh run samples (the YAML's default)."""
    cfg = OmegaConf.create(OmegaConf.to_container(compose([])))
    cfg.config_version = 1
    del cfg.guard["contribution_sample"]
    migrated = migrate(cfg)
    assert migrated.config_version == schema.CONFIG_VERSION >= 2
    assert migrated.guard.contribution_sample == 0
    validate(migrated)
    assert compose([]).guard.contribution_sample > 0


@pytest.mark.parametrize(
    ("version", "override", "resumes_with"),
    [
        (3, "train.lr_schedule=linear", {"lr_schedule": "constant", "lrf": 0.01}),
        (4, "train.keep_momentum=true", {"keep_momentum": False}),
    ],
)
def test_a_run_resumes_training_as_its_version_trained(version, override, resumes_with):
    """``train.lr_schedule`` came with version 4, ``train.keep_momentum`` with 5: an older run
    resumes with the constant rate and the fresh optimiser it trained with, whatever the YAML's
    default is now."""
    cfg = OmegaConf.create(OmegaConf.to_container(compose([override])))
    cfg.config_version = version
    for key in resumes_with:
        del cfg.train[key]
    migrated = migrate(cfg)
    assert {k: migrated.train[k] for k in resumes_with} == resumes_with
    assert migrated.config_version == schema.CONFIG_VERSION
    validate(migrated)


def test_a_config_from_a_newer_fedyolo_is_refused_in_one_line():
    cfg = OmegaConf.create(OmegaConf.to_container(compose([])))
    cfg.config_version = schema.CONFIG_VERSION + 1
    with pytest.raises(ConfigError, match="upgrade fedyolo") as e:
        migrate(cfg)
    assert "\n" not in str(e.value)


def test_defaults_live_once_in_the_yaml():
    """No checked field of the schema holds a default: the YAML gives every one of them, and a
    fresh compose leaves no value missing."""
    checked = [c for c in vars(schema).values() if is_dataclass(c) and issubclass(c, Checked)]
    assert len(checked) >= 17  # a class per group, each engine's, the whole
    for cls in checked:
        for f in fields(cls):
            if "check" in f.metadata:
                assert f.default == schema.MISSING, f"{cls.__name__}.{f.name}"
    cfg = compose([])
    assert OmegaConf.missing_keys(cfg) == set()
    for name in schema.ENGINES:
        assert OmegaConf.missing_keys(compose([f"engine={name}"]).engine) == set()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=zero", "config: train.epochs='zero' is invalid; expected an integer >= 1"),
        ("guard.bootstrap=10", "config: guard.bootstrap=10 is invalid; expected an integer >= 20"),
        (
            "engine.client_cpus=0",
            "config: engine.client_cpus=0 is invalid; expected an integer >= 1",
        ),
        ("transport.scheme=zip", "config: transport.scheme='zip' is invalid"),
    ],
)
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        compose([override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_resume_and_from_run_read_overrides_with_the_same_grammar_as_a_fresh_run(tmp_path):
    run = _old_run(tmp_path)
    # Hydra's grammar: a typed value is checked against the schema as in a fresh compose
    bad = ["engine=local-deployment", "engine.port=x"]
    for composed in (
        lambda: compose(bad),
        lambda: compose([f"resume={run}", *bad]),
        lambda: from_run(run, bad),
    ):
        with pytest.raises(ConfigError, match=r"engine\.port='x' is invalid; expected a port"):
            composed()
    switched = from_run(run, ["engine=local-deployment", "engine.port=8080"])
    assert switched.engine.name == "local-deployment" and switched.engine.port == 8080
    assert switched.engine.isolation == "namespace"  # the group's composed keys
    added = from_run(run, ["strategy=fedprox", "strategy.proximal_mu=0.1"])
    assert added.strategy.name == "fedprox" and added.strategy.proximal_mu == 0.1
    for bad in (["+note=x"], ["strategy=fedprox", "+strategy.proximal_mu=0.2"]):
        # not a key of the schema; + on a key that exists: refused by both, naming the key
        for composed in (lambda: compose(bad), lambda: from_run(run, bad)):  # noqa: B023
            with pytest.raises(ConfigError, match=bad[-1].split("=")[0][1:]) as e:
                composed()
            assert "\n" not in str(e.value)
    resumed = compose([f"resume={run}", "federation.rounds=5", "engine=local-deployment"])
    assert resumed.federation.rounds == 5 and resumed.guard.bootstrap == 200
    with pytest.raises(ConfigError, match="cannot change when resuming"):
        compose([f"resume={run}", "+note=x"])


def test_the_guard_takes_every_setting_from_the_config():
    """No default of its own that could contradict the YAML (bootstrap 0 once became 200)."""
    cfg = OmegaConf.create(OmegaConf.to_container(compose(["guard.bootstrap=50"]).guard))
    assert Guard(cfg).bootstrap == 50 and Guard(cfg).patience == 1
    del cfg["patience"]
    with pytest.raises(KeyError):
        Guard(cfg)


def test_every_schema_key_is_in_the_reference_with_its_range():
    from fl_server.schema import all_keys

    listed = {key: expected for key, _, expected in all_keys()}
    assert listed["train.imgsz"] == "an integer >= 32, a multiple of 32"
    assert "guard.patience" in listed and "engine" in listed and "strategy" in listed


def test_a_commands_settings_go_through_the_same_composer_and_grammar():
    """``fedyolo export|bench|deploy aws`` read ``configs/<name>.yaml`` with key=value as a run
    does (Hydra's grammar: a list is [1,4]); unknown keys and added ones are one line."""
    cfg = compose_settings("edge/bench", ["threads=[1,4]", "runs=5"], "bench")
    assert list(cfg.threads) == [1, 4] and cfg.runs == 5 and cfg.warmup == 10
    unknown = r"bench: unknown setting 'thread' \(see configs/edge/bench.yaml\)"
    with pytest.raises(ConfigError, match=unknown):
        compose_settings("edge/bench", ["thread=2"], "bench")
    for bad in ("+x=1", "runs"):
        with pytest.raises(ConfigError, match="key=value"):
            compose_settings("edge/bench", [bad], "bench")
    assert compose_settings("deploy/aws", [], "deploy aws").clients.max >= 1
