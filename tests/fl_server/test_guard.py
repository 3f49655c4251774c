"""The drift guard's rule and policies, and the fault specs, without training anything."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from fl_client import faults
from fl_server import state as state_mod
from fl_server.config import ConfigError, compose
from fl_server.guard import Guard, attribute, update_agreement


def guard(**over) -> Guard:
    cfg = OmegaConf.merge(compose([]).guard, over)
    return Guard(cfg)


# the rest of a server state, for the guard's state to go through fl_server.state
STATE = {
    "weights": np.zeros(2, np.float32),
    "best": (np.zeros(2, np.float32), None),
    "strategy": None,
}


def m(v: float) -> dict:
    return {"map50_95": v, "map50": 2 * v}


def test_drop_needs_both_relative_and_absolute_size():
    g = guard(max_drop=0.10, min_abs_drop=0.02, patience=0)
    g.accept(1, m(0.30))
    assert not g.check(2, m(0.28)).rolled_back  # 6.7 %: below the threshold
    d = g.check(2, m(0.26))  # 13 %, 0.04 absolute
    assert d.rolled_back and d.reference == 0.30 and d.drop == pytest.approx(0.1333, abs=1e-3)
    g2 = guard(max_drop=0.10, min_abs_drop=0.02, patience=0)
    g2.accept(1, m(0.05))
    assert not g2.check(2, m(0.035)).rolled_back  # 30 % of a tiny number: noise, not a drop


def test_reference_best_or_previous():
    best = guard(reference="best", patience=0)
    prev = guard(reference="previous", patience=0)
    for g in (best, prev):
        g.accept(1, m(0.40))
        g.accept(2, m(0.33))  # a drop the guard accepted (e.g. below min_abs_drop)
    assert best.check(3, m(0.34)).rolled_back  # 15 % below the best
    assert not prev.check(3, m(0.34)).rolled_back  # above the previous round


def test_a_moderate_drop_is_on_probation_and_rolls_back_only_if_it_lasts():
    """Honest FedAvg dips >10 % and recovers the next round; a lasting drop still rolls back,
    and a collapse (a weight fault: mAP ~0) or a NaN metric rolls back at once."""
    g = guard(max_drop=0.10, min_abs_drop=0.02, patience=1, severe_drop=0.5)
    g.accept(1, m(0.30))
    dip = g.check(2, m(0.25))  # 17 %: on probation, accepted
    assert dip.probation and not dip.rolled_back and dip.as_dict()["decision"] == "probation"
    assert g.accept(2, m(0.25), probation=True) is False
    assert g.state.previous_value == 0.30 and g.state.best_round == 1  # not a reference
    back = g.check(3, m(0.31))  # recovered: a new best, the probation is over
    assert not back.rolled_back and not back.probation and g.accept(3, m(0.31))
    assert g.state.probation == 0

    g.check(4, m(0.27))
    g.accept(4, m(0.27), probation=True)
    lasting = g.check(5, m(0.26))  # still >10 % below round 3: patience spent
    assert lasting.rolled_back and not lasting.probation and lasting.reference_round == 3
    g.rolled_back(5, [])
    assert g.state.probation == 0
    assert g.check(6, m(0.27)).probation  # after a rollback the patience is whole again

    for collapse in (0.10, float("nan")):  # >= severe_drop, or not a number: at once
        d = g.check(6, m(collapse))
        assert d.rolled_back and not d.probation
    g.accept(6, m(0.27), probation=True)
    assert g.check(7, m(0.0)).rolled_back
    g.rolled_back(7, [])
    assert g.check(8, m(0.27), final=True).rolled_back  # the run's last round: no probation
    lenient = guard(max_drop=0.10, min_abs_drop=0.02, patience=1, severe_drop=None)
    lenient.accept(1, m(0.30))
    assert lenient.check(2, m(0.0)).probation  # severe_drop=null: a collapse waits too
    assert lenient.check(2, m(float("nan"))).rolled_back  # but never a NaN
    # previous as the reference: the probation round is not the new "previous" either
    p = guard(reference="previous", max_drop=0.10, min_abs_drop=0.02, patience=1)
    p.accept(1, m(0.30))
    p.accept(2, m(0.25), probation=p.check(2, m(0.25)).probation)
    assert p.check(3, m(0.25)).rolled_back  # 17 % below round 1, two rounds running


def test_policies_and_stop_after():
    g = guard(policy="lower_lr", lr_factor=0.5, stop_after=2)
    g.accept(1, m(0.4))
    assert g.rolled_back(2, [])["lr_scale"] == 0.5 and not g.should_stop()
    assert g.rolled_back(3, [])["lr_scale"] == 0.25 and g.should_stop()
    g.accept(4, m(0.41))
    assert g.state.consecutive == 0 and g.state.lr_scale == 0.25  # the lower rate stays

    ex = guard(policy="exclude", exclude_rounds=2)
    ex.rolled_back(3, ["1"])
    assert ex.excluded(4) == {"1"} and ex.excluded(5) == {"1"} and ex.excluded(6) == set()
    restored = guard(policy="exclude", exclude_rounds=2)
    restored.load_state_dict(json.loads(json.dumps(ex.state_dict())))
    assert restored.excluded(5) == {"1"} and restored.state.rollbacks == 1


def _attribute(g: Guard, clients, value, reference, score):
    return attribute(clients, value, reference, score, lambda v: not g.is_drop(v, reference))


def test_leave_one_out_names_the_poisoned_client_among_weak_honest_ones():
    """The case that flaked: honest solo models scored 0.022 and 0.065, the poisoned one 0.0.

    Scored alone, the three are not separable; what each did to the aggregate is: any aggregate
    holding client 1's random weights is ~0, the honest pair's aggregate is back near 0.08.
    """
    g = guard(max_drop=0.10, min_abs_drop=0.04)
    calls = []

    def score(without: frozenset[str]) -> float:
        calls.append(without)
        return 0.001 if "1" not in without else 0.081

    found = _attribute(g, ["0", "1", "2"], value=0.0005, reference=0.089, score=score)
    assert found.culprits == ["1"]
    assert found.steps == [{"0": 0.001, "1": 0.081, "2": 0.001}]
    assert len(calls) == 3  # restored after one step: no second search


def test_leave_one_out_with_two_clients_and_with_several_culprits():
    g = guard(max_drop=0.10, min_abs_drop=0.02)
    # two clients: the aggregate without the poisoned one is the honest one alone
    two = _attribute(
        g, ["0", "1"], 0.0, 0.30, lambda w: {frozenset("0"): 0.0, frozenset("1"): 0.25}[w]
    )
    assert two.culprits == ["1"]

    # 1 and 3 poisoned with different strength: removing 3 helps first, then removing 1 restores
    def score(without: frozenset[str]) -> float:
        return 0.30 - 0.2 * ("3" not in without) - 0.1 * ("1" not in without)

    found = _attribute(g, ["0", "1", "2", "3"], 0.0, 0.30, score)
    assert found.culprits == ["3", "1"] and len(found.steps) == 2


def test_leave_one_out_names_nobody_on_noise_and_never_everybody():
    g = guard(max_drop=0.10, min_abs_drop=0.02)
    # an honest dip: every removal moves the aggregate a little, none restores it
    noisy = {"0": 0.262, "1": 0.259, "2": 0.264, "3": 0.258}
    found = _attribute(g, list(noisy), 0.26, 0.30, lambda w: noisy[next(iter(w))])
    assert found.culprits == [] and found.steps == [noisy]
    # every removal restores the same: ambiguous, nobody
    assert _attribute(g, ["0", "1"], 0.0, 0.3, lambda w: 0.3).culprits == []
    # at most n - 1 are named: with client 1 out the search stops, client 0 stays
    assert _attribute(g, ["0", "1"], 0.0, 0.3, lambda w: 0.3 * ("1" in w)).culprits == ["1"]
    # a single replier is never named, however bad the round
    assert _attribute(g, ["0"], 0.0, 0.3, lambda w: 0.3).culprits == []


def test_fault_specs_parse_and_reach_only_their_client():
    cfg = compose(
        [
            "federation.clients=3",
            "faults.client=1",
            "faults.round=[2,3]",
            "faults.kind=nan",  # YAML reads a bare nan as a float
            "faults.more=[{client: 2, round: 3, kind: hang, hang_seconds: 5}]",
        ]
    )
    fs = faults.parse(cfg.faults, 3)
    assert [(f.client, f.kind, f.rounds) for f in fs] == [(1, "nan", (2, 3)), (2, "hang", (3,))]
    r3 = faults.for_round(fs, 3, round_timeout=60)
    assert [f["kind"] for f in faults.mine(r3, 1)] == ["nan"]
    assert faults.mine(r3, 2)[0]["hang_seconds"] == 5.0
    assert faults.mine(r3, 0) == []
    assert faults.for_round(fs, 1, 60) == ""
    every = faults.parse({"client": 0, "kind": "hang"}, 1)
    assert json.loads(faults.for_round(every, 7, 60))[0]["hang_seconds"] == 90.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["faults.client=1", "faults.kind=explode"], "faults.kind='explode'"),
        (["faults.kind=crash"], "faults.client is missing"),
        (["faults.client=7", "faults.kind=crash"], "faults.client=7"),
        (["faults.client=1", "faults.kind=crash", "faults.round=0"], "rounds start at 1"),
        (["faults.more=[{client: 0, kind: hang, hang_seconds: -1}]"], "hang_seconds"),
        (["guard.max_drop=1.5"], "guard.max_drop"),
        (["guard.policy=pray"], "guard.policy"),
        (["guard.patience=-1"], "guard.patience"),
        (["guard.severe_drop=0"], "guard.severe_drop"),
    ],
)
def test_bad_fault_and_guard_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        compose(["federation.clients=2", *overrides])


def test_weight_faults_do_what_they_say():
    rng = np.random.default_rng(0)
    received = rng.standard_normal(1000).astype(np.float32)
    trained = received + 0.01 * rng.standard_normal(1000).astype(np.float32)
    nan = faults.corrupt_weights({"kind": "nan"}, trained, received, 0)
    assert np.isnan(nan).any() and not np.isnan(trained).any()
    scaled = faults.corrupt_weights({"kind": "scaled_weights", "scale": 10.0}, trained, received, 0)
    np.testing.assert_allclose(scaled - received, 10 * (trained - received), rtol=1e-4, atol=1e-6)
    rand = faults.corrupt_weights({"kind": "random_weights"}, trained, received, seed=7)
    assert abs(np.linalg.norm(rand) / np.linalg.norm(received) - 1) < 0.1
    assert abs(np.corrcoef(rand, received)[0, 1]) < 0.1


def _images(hits: list[bool]) -> dict:
    """Per-image matches as the evaluator keeps them: one target of class 0 per image and one
    prediction, a true positive at every IoU threshold when ``hit`` (else a false positive)."""
    return {
        "names": [f"{i:03d}.jpg" for i in range(len(hits))],
        "tp": [np.full((1, 10), h) for h in hits],
        "conf": [np.array([0.9 - 0.001 * i]) for i in range(len(hits))],
        "pred_cls": [np.zeros(1) for _ in hits],
        "target_cls": [np.zeros(1) for _ in hits],
    }


def _with_map(images: dict) -> dict:
    from fl_server.guard import metric_of

    return {"map50_95": metric_of(images, "map50_95"), "map50": 0.0, "images": images}


def test_a_drop_rolls_back_only_when_the_held_out_images_say_it_is_real():
    """The user's rule (10 % and min_abs_drop) fires in both cases; the paired bootstrap keeps
    a real drop (half the images lost) and accepts one image of eight going wrong, which the
    resamples that leave that image out cannot tell from no change."""
    ref = _images([True] * 8 + [True] * 52)
    g = guard(max_drop=0.10, min_abs_drop=0.0, significance=0.05, bootstrap=200)
    g.accept(0, _with_map(ref))
    real = g.check(1, _with_map(_images([True] * 30 + [False] * 30)))
    assert real.rolled_back and real.significant and real.drop_ci["low"] > 0.2

    small = _images([True] * 8)
    g = guard(max_drop=0.10, min_abs_drop=0.0, significance=0.05, bootstrap=200, patience=0)
    g.accept(0, _with_map(small))
    noisy = g.check(1, _with_map(_images([True] * 7 + [False])))
    assert noisy.drop > 0.10  # the rule alone would roll back
    assert not noisy.rolled_back and noisy.significant is False and noisy.drop_ci["low"] <= 0
    assert noisy.as_dict()["drop_ci"]["images"] == 8  # the evidence goes to metrics.jsonl

    off = guard(max_drop=0.10, min_abs_drop=0.0, significance=None, patience=0)
    off.accept(0, _with_map(small))
    d = off.check(1, _with_map(_images([True] * 7 + [False])))
    assert d.rolled_back and d.drop_ci is None  # significance off: the rule alone, as before
    # images evaluated in another order cannot be paired: the rule alone decides
    shuffled = _images([True] * 7 + [False])
    shuffled["names"] = shuffled["names"][::-1]
    g = guard(max_drop=0.10, min_abs_drop=0.0, significance=0.05, patience=0)
    g.accept(0, _with_map(small))
    assert g.check(1, _with_map(shuffled)).rolled_back


# client "2"'s classification-branch update pulls against the others' (update_agreement)
AGAINST_2 = {"0": 0.3, "1": 0.25, "2": -0.4}


def test_contributions_flag_a_client_that_hurts_over_two_participations(tmp_path):
    good, bad = _images([True] * 40), _images([True] * 20 + [False] * 20)
    g = guard(max_drop=0.10, significance=0.05, bootstrap=100, policy="exclude")
    everyone = _with_map(bad)  # the aggregate with client "2" in it
    without = {"0": _with_map(bad), "1": _with_map(bad), "2": _with_map(good)}
    r1 = g.contributions(1, everyone, without, AGAINST_2)
    assert r1["2"]["ci"]["low"] > 0 and r1["2"]["ci_2"] is None and not r1["2"]["flagged"]
    assert r1["0"]["gain"] == 0 and r1["2"]["vs_others"] == r1["2"]["gain"]
    # the first round's resamples survive a server restart exactly (an array in the state)
    resumed = guard(max_drop=0.10, significance=0.05, bootstrap=100, policy="exclude")
    state_mod.save(tmp_path / "s.npz", {**STATE, "guard": g.state_dict()})
    resumed.load_state_dict(state_mod.load(tmp_path / "s.npz")["guard"])
    r2 = g.contributions(2, everyone, without, AGAINST_2)
    assert r2["2"]["flagged"] and not any(r2[k]["flagged"] for k in ("0", "1"))
    assert r2["2"]["ci_2"]["rounds"] == [1, 2] and r2["2"]["gain_2"] == 2 * r1["2"]["gain"]
    again = resumed.contributions(2, everyone, without, AGAINST_2)["2"]
    assert {**again["ci_2"], "seconds": 0} == {**r2["2"]["ci_2"], "seconds": 0}
    # the same evidence from a client whose class branch pulls with the others': not flagged
    # (an honest client whose data differ from the held-out mix); unknown: not flagged either
    for agreement in ({"0": 0.3, "1": 0.3, "2": 0.2}, None):
        other = guard(max_drop=0.10, significance=0.05, bootstrap=100)
        other.contributions(1, everyone, without, agreement)
        r = other.contributions(2, everyone, without, agreement)
        assert r["2"]["ci_2"]["low"] > 0 and not r["2"]["flagged"]
    lenient = guard(max_drop=0.10, significance=0.05, bootstrap=100, flag_agreement=None)
    lenient.contributions(1, everyone, without)
    assert lenient.contributions(2, everyone, without)["2"]["flagged"]  # leave-one-out alone
    assert g.flag(2, "2") == 2 + g.exclude_rounds and g.excluded(3) == {"2"}
    # hurts once, then does what the others do: never flagged
    g = guard(max_drop=0.10, significance=0.05, bootstrap=100)
    g.contributions(1, everyone, without, AGAINST_2)
    r2 = g.contributions(2, _with_map(good), {k: _with_map(good) for k in "012"}, AGAINST_2)
    assert r2["2"]["ci_2"]["low"] > 0 and not any(v["flagged"] for v in r2.values())


def test_a_small_cost_over_two_rounds_is_flagged_and_an_honest_removal_is_not():
    """Label poisoning by one client of four cost the aggregate a few percent a round, far below
    the rollback rule's 10 % and not always significant in one round: two participations are
    summed, resample by resample. Removing an honest client makes the aggregate worse."""
    g = guard(max_drop=0.10, significance=0.05, bootstrap=200)
    clean = _with_map(_images([True] * 60))
    worse = _with_map(_images([True] * 50 + [False] * 10))
    lost = [(0, 1), (30, 31)]  # each round, the aggregate gets two other images of 60 wrong
    for rnd, wrong in enumerate(lost, start=1):
        everyone = _with_map(_images([i not in wrong for i in range(60)]))
        r = g.contributions(rnd, everyone, {"0": worse, "1": worse, "2": clean}, AGAINST_2)
        assert 0 < r["2"]["gain"] < 0.10 * clean["map50_95"]
        assert r["2"]["ci"]["low"] <= 0  # alone, within the held-out set's noise
    assert r["2"]["ci_2"]["low"] > 0 and r["2"]["flagged"]  # significant over two rounds
    assert r["0"]["gain"] < 0 and not r["0"]["flagged"] and not r["1"]["flagged"]
    # significant, but smaller than guard.min_flag_gain: not flagged
    floor = guard(max_drop=0.10, significance=0.05, bootstrap=200, min_flag_gain=0.2)
    for rnd, wrong in enumerate(lost, start=1):
        everyone = _with_map(_images([i not in wrong for i in range(60)]))
        r = floor.contributions(rnd, everyone, {"0": worse, "1": worse, "2": clean}, AGAINST_2)
    assert r["2"]["ci_2"]["low"] > 0 and r["2"]["gain_2"] < 0.2 and not r["2"]["flagged"]


def test_a_round_where_every_removal_helps_alike_names_nobody():
    """An aggregate worse than any three of its four replies (say, a round whose mean overshot):
    each removal helps, significantly, and alike, so nobody did worse than the others."""
    g = guard(max_drop=0.10, significance=0.05, bootstrap=200)
    everyone = _with_map(_images([True] * 40 + [False] * 20))
    better = _with_map(_images([True] * 55 + [False] * 5))
    for rnd in (1, 2, 3):
        r = g.contributions(rnd, everyone, {k: better for k in "0123"}, {k: -0.5 for k in "0123"})
    assert all(v["ci_2"]["low"] > 0 and v["vs_others"] == 0 for v in r.values())
    assert not any(v["flagged"] for v in r.values())


def test_kept_matches_round_trip_exactly(tmp_path):
    from fl_server.guard import load_images, metric_of, save_images

    images = _images([True] * 5 + [False] * 3)
    images["tp"][2] = np.zeros((0, 10), dtype=bool)  # an image without predictions
    images["conf"][2], images["pred_cls"][2] = np.zeros(0), np.zeros(0)
    save_images(tmp_path / "eval" / "round_0001.npz", images)
    back = load_images(tmp_path / "eval" / "round_0001.npz")
    assert back["names"] == images["names"]
    for k in ("tp", "conf", "pred_cls", "target_cls"):
        assert [a.tolist() for a in back[k]] == [np.asarray(a).tolist() for a in images[k]], k
    assert metric_of(back, "map50_95") == metric_of(images, "map50_95")


def test_update_agreement_is_the_median_cosine_with_the_others_updates():
    base = np.array([1.0, 1.0, 1.0, 5.0])
    mask = np.array([True, True, True, False])  # the last value is not compared
    ups = {
        "0": base + [1, 1, 0, 9],
        "1": base + [1, 0.9, 0.1, -9],
        "2": base + [0.9, 1, 0, 0],
        "3": base - [10, 10, 0, 0],  # pulls hard against the three others
    }
    agree = update_agreement(base, ups, mask)
    # (against the mean of the others, which "3" dominates, 0-2 would look as bad as "3")
    assert min(agree[k] for k in "012") > 0.99 and agree["3"] < -0.99
    assert update_agreement(base, {"0": base, "1": base + 1}, mask)["0"] == 0.0  # no update
