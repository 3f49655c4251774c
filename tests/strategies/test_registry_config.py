"""Strategy and transport settings: good ones build, bad ones stop the run in one line."""

from __future__ import annotations

import pytest
from flwr.serverapp import strategy as fl

from fl_server.config import ConfigError, compose
from strategies import REGISTRY, build_strategy


@pytest.mark.parametrize(
    "overrides,cls,attr,value",
    [
        (["strategy=fedadam", "strategy.eta=0.02"], fl.FedAdam, "eta", 0.02),
        (["strategy=fedprox", "strategy.proximal_mu=0.1"], fl.FedProx, "proximal_mu", 0.1),
        (["strategy=fedtrimmedavg", "strategy.beta=0.1"], fl.FedTrimmedAvg, "beta", 0.1),
        (
            ["strategy=krum", "federation.clients=5", "strategy.num_malicious_nodes=1"],
            fl.Krum,
            "num_malicious_nodes",
            1,
        ),
        (["strategy=qfedavg"], fl.QFedAvg, "q", 0.1),
    ],
)
def test_parameters_reach_the_flower_strategy(overrides, cls, attr, value):
    s = build_strategy(compose(overrides))
    assert type(s.inner) is cls and getattr(s.inner, attr) == value


def test_dp_wraps_the_strategy_and_client_dp_needs_plain_weights():
    dp = "strategy.dp={kind: server-fixed, noise_multiplier: 0.1, clipping_norm: 10.0}"
    s = build_strategy(compose([dp]))
    assert isinstance(s.inner, fl.DifferentialPrivacyServerSideFixedClipping)
    client = "strategy.dp={kind: client-fixed, noise_multiplier: 0.1, clipping_norm: 10.0}"
    with pytest.raises(ConfigError, match="use transport=fp32"):
        compose([client, "transport=q8"])
    with pytest.raises(ConfigError, match="transport.down=fp32"):  # the mod reads the model
        compose([client, "transport.down=q4z"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["strategy=nope"], "Could not find 'strategy/nope'; choose one of"),
        (["strategy=fedadam", "+strategy.etaa=1"], "strategy.etaa: FedAdam has no parameter"),
        (["strategy=fedadam", "strategy.eta=-1"], "strategy.eta: -1 is out of range"),
        (["strategy=fedadam", "strategy.eta=fast"], "strategy.eta: 'fast' has the wrong type"),
        (["strategy=fedtrimmedavg", "strategy.beta=0.5"], "strategy.beta: 0.5 is out of range"),
        (["strategy=bulyan", "strategy.num_malicious_nodes=1"], "needs at least 4f+3=7"),
        (["+strategy.fraction_train=0.5"], "is set by federation.fraction"),
        (["strategy=fedbn", "strategy.local=[wheels]"], "unknown model parts ['wheels']"),
        (["strategy.bn_stats=median"], "strategy.bn_stats: 'median' is invalid"),
        (["strategy=fedpartial", "strategy.local=[backbone,neck,head]"], "nothing would be"),
        (["strategy=custom"], "strategy._target_"),
        (["strategy=custom", "strategy._target_=nowhere.Strategy"], "is not trusted"),
        (["strategy.dp={kind: magic}"], "strategy.dp.kind: 'magic' is unknown"),
        (["transport=zip"], "Could not find 'transport/zip'"),
        (["transport=topk", "transport.fraction=2"], "transport.fraction=2"),
        (["aggregation.min_replies=3"], "min_replies=3 is more than the 2 clients"),
        (["aggregation.max_update_ratio=-1"], "aggregation.max_update_ratio=-1"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides,pooled,averaged",
    [
        ([], False, False),  # FedAvg averages everything itself
        (["strategy=fedadam"], False, True),  # auto: a server optimizer must not step statistics
        (["strategy.bn_stats=pooled"], True, True),
        (["strategy=fedavgm", "strategy.bn_stats=pooled"], True, True),
    ],
)
def test_bn_stats_choose_how_the_statistics_are_combined(overrides, pooled, averaged):
    from fl_client.model import build_model, part_masks

    masks = part_masks(build_model("fedyolo-tiny.yaml", ["a", "b"]))
    s = build_strategy(compose(overrides), masks=masks)
    assert (s.bn_stats_mask is not None) is averaged
    assert (s.bn_pooled is not None) is pooled


@pytest.mark.parametrize(
    "target,message",
    [
        ("nowhere.Strategy", "cannot import nowhere:Strategy"),
        ("collections.OrderedDict", "not a Flower Strategy class"),
    ],
)
def test_a_trusted_plugin_that_is_missing_or_no_strategy_is_refused_in_one_line(target, message):
    """Trusted on the command line (``--trust-plugin``, here ``plugins.trusting``)."""
    from fl_server import plugins

    with plugins.trusting([target]), pytest.raises(ConfigError) as e:
        compose(["strategy=custom", f"strategy._target_={target}"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_registered_strategy_has_a_config_file():
    from fl_server.config import CONFIG_DIR

    files = {p.stem for p in (CONFIG_DIR / "strategy").glob("*.yaml")}
    assert set(REGISTRY) <= files and files - set(REGISTRY) == {"custom"}
