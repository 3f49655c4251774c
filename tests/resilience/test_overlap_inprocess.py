"""``federation.overlap_eval``: round r+1's clients train while the server evaluates round r.

When the guard accepts, the overlapped round must be the round a sequential run has: the same
clients, config and model, so the same records bit for bit. When it does not, the overlapped
replies are discarded (``round_discarded``), the round runs again from the model the guard
left, and the cost of the lost work is still counted (``RunDir.client_work``).
"""

from __future__ import annotations

import time

import pytest
from inprocess import InProcessGrid, ServerKilled, resume_inprocess, run_inprocess

from fl_server.records import EventKind
from fl_server.run_dir import read_jsonl
from fl_server.state import load as load_state

# 3 clients, 2 sampled per round by recency: the sampler's state is part of what must match
CFG = [
    "federation.rounds=3",
    "federation.fraction=0.67",
    "federation.sampling=recency",
    "strategy=fedadam",
    "strategy.eta=0.01",
]
KEYS = ("global_sha256", "weights_sha256", "map50_95", "lr0")


def _rounds(run) -> list[tuple]:
    return [
        (r["round"], *(r[k] for k in KEYS), sorted(c["id"] for c in r["clients"]))
        for r in run.rounds()
    ]


def test_overlapped_rounds_are_the_sequential_rounds(tmp_path):
    seq, _ = run_inprocess(tmp_path / "a", [*CFG, "federation.overlap_eval=false"], name="s")
    t0 = time.perf_counter()
    ovl, grid = run_inprocess(tmp_path / "b", [*CFG, "federation.overlap_eval=true"], name="o")
    wall = time.perf_counter() - t0
    assert _rounds(ovl) == _rounds(seq)
    assert all(len(r["clients"]) == 2 for r in ovl.rounds())  # sampled, not everyone
    kinds = [e["kind"] for e in read_jsonl(ovl.events)]
    assert "round_discarded" not in kinds
    (start,) = [e for e in read_jsonl(ovl.events) if e["kind"] == "run_start"]
    (seq_start,) = [e for e in read_jsonl(seq.events) if e["kind"] == "run_start"]
    assert start["overlap_eval"] is True and seq_start["overlap_eval"] is False
    # a round's time runs from the previous round's record to its own: overlapped rounds are
    # not counted twice, so their sum stays within the run's wall time (timing each round from
    # its training's start would count round r+1's training in round r's time too)
    assert sum(r["round_seconds"] for r in ovl.rounds()) <= wall
    assert all(r["round_seconds"] >= r["aggregate_seconds"] for r in ovl.rounds())


@pytest.mark.parametrize("overlap", [False, True])
def test_a_server_killed_during_the_overlap_resumes_like_an_uninterrupted_run(tmp_path, overlap):
    flag = f"federation.overlap_eval={str(overlap).lower()}"
    ref, _ = run_inprocess(tmp_path / "a", [*CFG, flag], name="ref")
    # killed when round 3's training starts: with the overlap that is during round 2's
    # evaluation, so round 2 is not finished (nothing of it saved), without it round 2 is
    grid = InProcessGrid(3, kill_at=3)
    with pytest.raises(ServerKilled):
        run_inprocess(tmp_path / "b", [*CFG, flag], grid=grid, name="killed")
    run = ref.__class__(tmp_path / "b" / "runs" / "killed")
    assert [r["round"] for r in run.rounds()] == ([1] if overlap else [1, 2])
    resume_inprocess(run, InProcessGrid(3))
    assert _rounds(run) == _rounds(ref)


def test_client_work_counts_a_discarded_round(tmp_path):
    run, _ = run_inprocess(tmp_path, ["federation.rounds=1"], clients=2)
    work = run.client_work()
    rounds = run.rounds()
    assert work["train_seconds"] == pytest.approx(
        sum(c["train_seconds"] for r in rounds for c in r["clients"])
    )
    run.event(
        2, EventKind.ROUND_DISCARDED, reason="t", replies=2, client_train_seconds=1.5, bytes=10
    )
    after = run.client_work()
    assert after["train_seconds"] == pytest.approx(work["train_seconds"] + 1.5)
    assert after["bytes"] == work["bytes"] + 10


class _Refused(RuntimeError):
    pass


def test_a_failed_overlapped_exchange_costs_the_round_before_it_nothing(tmp_path):
    """Round 3's exchange fails (here: every time, as with too few clients for too long). Begun
    during round 2's evaluation, its failure must not take round 2 with it: round 2 is judged,
    recorded and saved, round 3 is tried again as a round of its own, and the run fails there
    with the error's reason, resumable after round 2."""

    def refuse(rnd, grid):
        if rnd == 3:
            raise _Refused("only 0 usable client(s) connected")

    grid = InProcessGrid(3)
    grid.on_round = refuse
    run, _ = run_inprocess(tmp_path, CFG, grid=grid, name="refused")
    summary = run.read_summary()
    assert summary["status"] == "failed" and "only 0 usable" in summary["reason"], summary
    assert [r["round"] for r in run.rounds()] == [1, 2]
    (discarded,) = [e for e in read_jsonl(run.events) if e["kind"] == "round_discarded"]
    assert discarded["round"] == 3 and "_Refused" in discarded["reason"], discarded
    assert load_state(run.state)["round"] == 2
