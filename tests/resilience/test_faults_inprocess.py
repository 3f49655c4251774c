"""Injected faults in real rounds: each is recorded with the client and reason, and the round
completes with the clients that behaved. A disconnected client that comes back gets the current
global model."""

from __future__ import annotations

import yaml
from inprocess import run_inprocess

from fl_client import faults
from fl_server.run_dir import read_jsonl


def test_faults_are_survived_and_recorded(tmp_path):
    def disconnect_client_3(rnd, grid):
        if rnd == 2:
            grid.down.add(4)  # node 4 is client 3: gone in the middle of round 2
        if rnd == 3:  # (called after round 3's sampling, which no longer saw node 4)
            grid.down.discard(4)  # back: round 4 samples it again

    from inprocess import InProcessGrid

    grid = InProcessGrid(4)
    grid.on_round = disconnect_client_3
    run, _ = run_inprocess(
        tmp_path,
        [
            "federation.rounds=4",
            "faults.more=[{client: 1, round: 1, kind: crash}, {client: 2, round: 1, kind: nan},"
            " {client: 3, round: 1, kind: scaled_weights, scale: 100},"
            " {client: 0, round: 2, kind: corrupt_labels}]",
        ],
        clients=4,
        grid=grid,
    )
    rounds = run.rounds()
    ids = [sorted(c["id"] for c in r["clients"]) for r in rounds]
    assert ids == [[0], [0, 1, 2], [0, 1, 2], [0, 1, 2, 3]]
    events = read_jsonl(run.events)
    bad = {(e["round"], e["kind"], e["client"]): e["reason"] for e in events if "client" in e}
    assert "injected fault crash (client 1, round 1)" in bad[(1, "client_failed", 1)]
    assert "non-finite" in bad[(1, "update_rejected", 2)]
    assert "aggregation.max_update_ratio" in bad[(1, "update_rejected", 3)]
    assert "no reply" in bad[(2, "client_failed", 3)]
    assert [r["failures"] for r in rounds] == [3, 1, 0, 0]
    # Rejoined in round 4 with the current global model (round 3's), like everyone else.
    sent = grid.received[4]
    assert set(sent.values()) == {rounds[2]["global_sha256"]} and 4 in sent
    assert all(not r["guard"]["rolled_back"] for r in rounds)
    assert read_jsonl(run.events)[-1] == {"round": 4, "kind": "run_end", "status": "completed"}


def test_flipped_label_shard(tiny_data, tmp_path):
    flipped = faults.flipped_label_shard(tiny_data, tmp_path / "flip", nc=4)
    spec = yaml.safe_load(flipped.read_text())
    original = yaml.safe_load(tiny_data.read_text())
    src = tiny_data.parent / original["train"]
    images = sorted((tmp_path / "flip" / "images" / "train").iterdir())
    assert images and all(p.is_symlink() for p in images)
    n_boxes = 0
    for img in images:
        a = (src.parent / "labels" / f"{img.stem}.txt").read_text().split("\n")
        b = (tmp_path / "flip" / "labels" / "train" / f"{img.stem}.txt").read_text().split("\n")
        for la, lb in zip([x for x in a if x], [x for x in b if x], strict=True):
            ca, *box_a = la.split()
            cb, *box_b = lb.split()
            assert int(cb) == (int(ca) + 1) % 4 and box_a == box_b
            n_boxes += 1
    assert n_boxes > 0
    assert spec["val"] == str(tiny_data.parent / original["val"])  # validation untouched
