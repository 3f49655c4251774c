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
        (["guard.contribution_sample=-1"], "guard.contribution_sample=-1"),
        (["guard.contribution_sample=2.5"], "guard.contribution_sample"),
        (["guard.contribution_sample=all"], "guard.contribution_sample"),
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


# -- guard.contribution_sample: which clients are scored when the round has more ---------------
def _sampled(sample: int, **over) -> Guard:
    return guard(contribution=True, contribution_sample=sample, **over)


def test_a_sample_scores_every_client_of_a_small_round_and_picks_in_order_in_a_big_one():
    ids = [str(i) for i in range(10)]
    agree = {k: 0.3 for k in ids}
    g = _sampled(4)
    assert g.to_score(ids[:4], agree) == ids[:4]  # K <= sample: every client, as before
    assert _sampled(0).to_score(ids, agree) == ids  # 0: no limit
    # "5" pulls against the others and its last scored gain was > 0 (evidence pending); "6"
    # and "7" pull against them harder but hold no pending evidence; at most sample - sample//2
    # = 2 slots go to such clients out of turn: "5" first, then the lowest agreement, "6"
    agree |= {"5": -0.1, "6": -0.5, "7": -0.3}
    g.state.gains = {"5": {"gain": 0.02}, "6": {"gain": -0.01}, "0": {"gain": 0.05}}
    # the rest in rotation: never scored ("3", "4") before the least recently scored
    g.state.participated = {"0": 3, "1": 1, "2": 2, "5": 3, "6": 3, "7": 3, "8": 1, "9": 3}
    assert g.to_score(ids, agree) == ["3", "4", "5", "6"]
    # "0"'s pending evidence does not count while its update pulls with the others' (no flag
    # could name it this round): its turn comes in rotation
    g.state.participated |= {"3": 3, "4": 3}
    assert g.to_score(ids, agree) == ["1", "5", "6", "8"]  # rotation: rounds 1, ties by id
    # guard.flag_agreement=null: a flag reads leave-one-out alone, so every client may be
    # watched: pending evidence first ("0", "5"), then the rotation
    lenient = _sampled(4, flag_agreement=None)
    lenient.state = g.state
    assert lenient.to_score(ids, agree) == ["0", "1", "5", "8"]
    # the rotation breaks ties by the lowest agreement: a fresh fleet starts with the suspects
    fresh = _sampled(4)
    assert fresh.to_score(ids, {k: 0.3 - 0.01 * int(k) for k in ids}) == ["6", "7", "8", "9"]


@pytest.mark.parametrize("suspects", [0, 2, 12])
def test_a_sample_never_leaves_a_client_unscored_longer_than_its_bound(suspects):
    """30 clients reply every round, 8 scored: while nobody pulls against the others, a
    round robin (every ceil(30/8) = 4 rounds); with suspects, they are scored out of turn and
    the rotation keeps at least 8 // 2 slots: every ceil(30/4) = 8 rounds at worst. Agreement and
    other clients' gains are drawn at random each round (pending evidence comes and goes)."""
    rng = np.random.default_rng(suspects)
    ids = [str(i) for i in range(30)]
    g = _sampled(8)
    last, times = dict.fromkeys(ids, 0), dict.fromkeys(ids, 0)
    gaps, poisoner_scored = [], 0
    for rnd in range(1, 41):
        agree = {k: float(rng.uniform(0.05, 0.8)) for k in ids}
        for k in rng.choice(ids, suspects, replace=False):
            agree[k] = float(rng.uniform(-0.8, -0.01))
        if suspects:
            agree["29"] = -0.9  # the label flipper: pulls hardest against the others
        picked = g.to_score(ids, agree)
        assert len(picked) == 8 and len(set(picked)) == 8
        poisoner_scored += "29" in picked
        for k in picked:  # what Guard.contributions records for a scored client
            gaps.append(rnd - last[k])
            last[k], times[k] = rnd, times[k] + 1
            g.state.participated[k] = rnd
            # its last gain: > 0 for the flipper (leaving it out helps), either sign for others
            gain = float(rng.normal())
            g.state.gains[k] = {"gain": abs(gain) if k == "29" and suspects else gain}
    gaps += [41 - last[k] for k in ids]  # and none left waiting at the end
    assert max(gaps) <= (4 if not suspects else 8)
    assert sum(times.values()) == 40 * 8
    if suspects:
        assert poisoner_scored == 40  # watched every round it pulls against the others


def test_the_flag_rule_reads_the_last_two_scored_participations():
    """A round in which a client replied but was not scored is no evidence: its two-round sum
    pairs the rounds it was scored in."""
    good, bad = _images([True] * 40), _images([True] * 20 + [False] * 20)
    g = guard(max_drop=0.10, significance=0.05, bootstrap=100)
    everyone = _with_map(bad)
    without = {"0": _with_map(bad), "1": _with_map(bad), "2": _with_map(good)}
    r1 = g.contributions(1, everyone, without, AGAINST_2)
    assert r1["2"]["ci"]["low"] > 0 and not r1["2"]["flagged"]
    r2 = g.contributions(2, everyone, {k: without[k] for k in "01"}, AGAINST_2)  # "2" unscored
    assert "2" not in r2 and g.state.participated["2"] == 1
    assert r2["0"]["ci_2"]["rounds"] == [1, 2]
    r3 = g.contributions(3, everyone, without, AGAINST_2)
    assert r3["2"]["flagged"] and r3["2"]["ci_2"]["rounds"] == [1, 3]
    assert r3["2"]["gain_2"] == 2 * r1["2"]["gain"]
    assert not any(r3[k]["flagged"] for k in "01")


def _step_round(tmp_path, sample: int, rounds: int = 2, clients: int = 12):
    """GuardStep's contribution scoring over ``rounds`` rounds of ``clients`` replies, the
    held-out evaluation faked: the classification branch (first 3 values) of the aggregate
    decides how many of 60 held-out images it gets right; client "3" pulls it the wrong way
    (a label flipper), every other client the right way. Returns the step's results, the
    rounds' logs and the evaluations made."""
    from flwr.app import Array, ArrayRecord

    from fl_client.model import WEIGHTS_KEY
    from fl_server.guard.step import GuardStep
    from fl_server.observed_grid import RoundLog
    from fl_server.run_dir import RunDir

    rng = np.random.default_rng(0)
    calls = []

    def evaluate(record, path, rnd):
        w = record[WEIGHTS_KEY].numpy()
        calls.append(rnd)
        right = round(60 * float(np.clip(w[:3].mean(), 0, 1)) ** 4)
        return _with_map(_images([True] * right + [False] * (60 - right)))

    g = _sampled(sample, max_drop=0.10, significance=0.05, bootstrap=100)
    run = RunDir(tmp_path)
    run.path.mkdir(parents=True, exist_ok=True)
    step = GuardStep(run, g, evaluate, np.arange(6) < 3, False, lambda: None)
    base = np.zeros(6, np.float32)
    sent = ArrayRecord({WEIGHTS_KEY: Array(base)})
    out, logs = [], []
    for rnd in range(1, rounds + 1):
        log = RoundLog()
        for i in range(clients):
            k = str(i)
            cls = -1.0 if k == "3" else 1.0
            up = np.concatenate([cls + 0.05 * rng.standard_normal(3), rng.standard_normal(3)])
            log.updates[k] = up.astype(np.float32)
            log.clients.append({"id": i, "num_examples": 10 + i})
        out.append(step._contributions(rnd, log, sent))
        logs.append(log)
    return out, logs, calls, run


def test_a_sampled_round_scores_the_flipper_and_flags_it_in_its_second_round(tmp_path):
    (r1, r2), logs, calls, run = _step_round(tmp_path, sample=4)
    assert r1[1] == r2[1] == 4 and calls == [1] * 5 + [2] * 5  # 1 + 4 evaluations, not 1 + 12
    for log in logs:
        by_id = {str(e["id"]): e for e in log.clients}
        assert sum(e["loo_scored"] for e in log.clients) == 4
        assert by_id["3"]["loo_scored"] and by_id["3"]["loo_gain"] > 0
        for e in log.clients:  # every entry keeps its agreement; an unscored one no loo_gain
            assert -1 <= e["cls_agreement"] <= 1
            assert ("loo_gain" in e) == e["loo_scored"]
    assert (
        by_id["3"]["cls_agreement"]
        < 0
        < min(e["cls_agreement"] for e in logs[1].clients if e["id"] != 3)
    )
    flags = [(e["round"], e["client"]) for e in run.read_events() if e["kind"] == "client_flagged"]
    assert flags == [(2, "3")]  # its second round, nobody honest


def test_a_sample_at_least_the_round_scores_every_client_as_before(tmp_path):
    """K <= guard.contribution_sample: every client, each mean summed exactly as before; the
    sampled path's means (one weighted sum, each client subtracted) agree with them."""
    from fl_client.model import WEIGHTS_KEY
    from fl_server.guard.step import WeightedSum, mean_without

    [(_, scored)], logs, calls, _ = _step_round(tmp_path / "a", sample=12, rounds=1)
    assert scored == 12 and len(calls) == 13
    assert all(e["loo_scored"] for e in logs[0].clients)
    [(_, scored_0)], logs_0, _, _ = _step_round(tmp_path / "b", sample=0, rounds=1)
    assert scored_0 == 12

    def timeless(entry: dict) -> dict:  # a bootstrap interval carries the seconds it took
        return {
            k: {**v, "seconds": 0} if isinstance(v, dict) and "seconds" in v else v
            for k, v in entry.items()
        }

    for a, b in zip(logs[0].clients, logs_0[0].clients, strict=True):
        assert timeless(a) == timeless(b)  # the same scores bit for bit: sample K or off
    log = logs[0]
    for excluded in (frozenset(), frozenset({"3"}), frozenset({"0", "11"})):
        exact = mean_without(log, excluded)[WEIGHTS_KEY].numpy()
        np.testing.assert_allclose(WeightedSum(log)(excluded)[WEIGHTS_KEY].numpy(), exact, 1e-6)
