"""Hostile neighbours (issue 28, items 6 and 7): a node cannot answer for another node's
partition, and a server cannot make a node that did not opt in act out injected faults.

Both run the real ServerApp loop and ClientApp in this process (``tests/inprocess.py``), two
clients, one or two rounds of the tiny model.
"""

from __future__ import annotations

from flwr.app import Message
from inprocess import InProcessGrid, run_inprocess

from fl_client import faults
from fl_client.client_app import _fault_opt_in_mod, app_with_fault_injection
from fl_server.run_dir import read_jsonl


def _claim(partition: int, from_call: int = 1):
    """A tamper hook: from its ``from_call``-th train reply on, the node claims ``partition``."""
    calls = {"n": 0}

    def tamper(reply: Message) -> Message:
        calls["n"] += 1
        if calls["n"] >= from_call and reply.content.metric_records:
            next(iter(reply.content.metric_records.values()))["partition-id"] = partition
        return reply

    return tamper


def _rejections(run) -> list[dict]:
    return [e for e in read_jsonl(run.events) if e["kind"] == "update_rejected"]


def test_a_node_claiming_another_nodes_partition_is_rejected_and_the_honest_reply_counts(
    tmp_path,
):
    # node 1 is partition 0, node 2 partition 1; in round 2 node 2 answers first as partition 0
    grid = InProcessGrid(2, tamper={2: _claim(0, from_call=2)})
    grid.node_ids = [2, 1]  # the impostor is sent to, and answers, first
    run, _ = run_inprocess(tmp_path, ["federation.rounds=2"], clients=2, grid=grid)
    rounds = run.rounds()
    assert [sorted(c["id"] for c in r["clients"]) for r in rounds] == [[0, 1], [0]]
    (honest,) = rounds[1]["clients"]
    assert honest["node_id"] == 1  # partition 0's reply is its own node's
    (rejected,) = _rejections(run)
    assert rejected["round"] == 2 and rejected["node_id"] == 2 and rejected["client"] == 1
    assert rejected["claimed_partition"] == 0 and rejected["bound_partition"] == 1
    assert "claims partition-id 0, but it is bound to partition 1" in rejected["reason"]
    assert rounds[1]["failures"] == 1


def test_nodes_that_first_claim_one_partition_together_are_not_bound(tmp_path):
    """Which of two first claims is honest cannot be told: neither counts nor binds."""
    grid = InProcessGrid(2, tamper={2: _claim(0)})
    run, _ = run_inprocess(tmp_path, ["federation.rounds=1"], clients=2, grid=grid)
    assert run.rounds()[0]["clients"] == []
    rejected = _rejections(run)
    assert sorted(e["node_id"] for e in rejected) == [1, 2]
    assert all(e["claimed_partition"] == 0 and e["claimed_by"] == [1, 2] for e in rejected)
    kinds = [e["kind"] for e in read_jsonl(run.events)]
    assert "round_failed" in kinds


def test_a_node_without_the_opt_in_trains_honestly_and_says_it_ignored_the_faults(tmp_path):
    grid = InProcessGrid(2, fault_injection=False)
    overrides = [
        "federation.rounds=1",
        "faults.more=[{client: 0, round: 1, kind: nan}, {client: 1, round: 1, kind: crash}]",
    ]
    run, _ = run_inprocess(tmp_path, overrides, clients=2, grid=grid)
    (rnd,) = run.rounds()
    assert sorted(c["id"] for c in rnd["clients"]) == [0, 1] and rnd["failures"] == 0
    assert all(c["faults_ignored"] == 1 for c in rnd["clients"])
    ignored = [e for e in read_jsonl(run.events) if e["kind"] == "faults_ignored"]
    assert sorted(e["client"] for e in ignored) == [0, 1]
    assert all("fault-injection=true" in e["reason"] for e in ignored)


def test_only_an_explicit_opt_in_lets_a_node_act_faults_out():
    assert faults.opted_in({"fault-injection": True})
    assert faults.opted_in({"fault-injection": "true"})
    for node in ({}, {"fault-injection": False}, {"fault-injection": "no"}):
        assert not faults.opted_in(node)


def test_the_simulation_engines_opted_in_app_sets_the_node_config():
    class Ctx:
        node_config = {"partition-id": 0}

    seen = {}
    _fault_opt_in_mod(None, Ctx(), lambda m, c: seen.update(c.node_config))
    assert faults.opted_in(seen)
    assert app_with_fault_injection() is not None
