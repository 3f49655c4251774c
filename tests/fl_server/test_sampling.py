"""``federation.sampling``: the policies prefer whom they say, none starves a client, and a
resumed run samples as an uninterrupted one."""

from __future__ import annotations

import pytest

from fl_server.sampling import Sampler

NODES = list(range(1, 21))  # 20 connected clients, 4 sampled a round


def _simulate(sampler: Sampler, rounds: range, answers, k: int = 4) -> dict[int, list[int]]:
    picked: dict[int, list[int]] = {}
    for rnd in rounds:
        chosen = sampler.choose(rnd, NODES, k, lambda n: n)
        assert chosen is not None and len(set(chosen)) == k and set(chosen) <= set(NODES)
        picked[rnd] = chosen
        for n in chosen:
            examples = answers(n, rnd)
            if examples:
                sampler.answered(n, examples)
    return picked


def _gaps(picked: dict[int, list[int]]) -> int:
    """The longest run of rounds any client waited between two samples (or from the start)."""
    last = dict.fromkeys(NODES, 0)
    worst = 0
    for rnd in sorted(picked):
        for n in picked[rnd]:
            worst = max(worst, rnd - last[n])
            last[n] = rnd
    return max(worst, *(max(picked) - v for v in last.values()))


def test_data_prefers_clients_with_more_examples_and_starves_none():
    sampler = Sampler("data", max_skip=8, seed=0)
    big = set(NODES[:5])
    picked = _simulate(sampler, range(1, 201), lambda n, r: 1000 if n in big else 50)
    counts = {n: sum(n in c for c in picked.values()) for n in NODES}
    assert min(counts[n] for n in big) > max(counts[n] for n in NODES if n not in big)
    # weighted alone, a small client would wait ~30 rounds on average; overdue ones go first
    assert _gaps(picked) <= 8 + len(NODES) // 4


def test_recency_lets_clients_that_do_not_answer_sink_but_not_vanish():
    sampler = Sampler("recency", max_skip=12, seed=1)
    away = set(NODES[:10])  # half the fleet never answers (offline robots)
    picked = _simulate(sampler, range(1, 201), lambda n, r: 0 if n in away else 100)
    late = [c for r, c in picked.items() if r > 20]
    share_away = sum(n in away for c in late for n in c) / sum(len(c) for c in late)
    assert share_away < 0.5  # uniform sampling would give them half the slots
    assert all(any(n in c for c in late) for n in away)  # still tried
    assert _gaps(picked) <= 12 + len(NODES) // 4


def test_uniform_is_flowers_and_a_resumed_sampler_chooses_as_an_uninterrupted_one():
    assert Sampler("uniform", 10, 0).choose(1, NODES, 4, lambda n: n) is None
    answers = lambda n, r: 10 * n  # noqa: E731
    whole = _simulate(Sampler("data", 5, 3), range(1, 31), answers)
    first = Sampler("data", 5, 3)
    part = _simulate(first, range(1, 16), answers)
    resumed = Sampler("data", 5, 3)
    resumed.load_state_dict(first.state_dict())
    part.update(_simulate(resumed, range(16, 31), answers))
    assert part == whole
    with pytest.raises(ValueError, match="federation.sampling='newest'"):
        Sampler("newest", 5, 0)
