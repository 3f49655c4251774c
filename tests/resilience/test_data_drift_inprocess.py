"""A client's world changes mid-run (its camera now sees night): the server flags that client."""

from __future__ import annotations

import cv2
from inprocess import InProcessGrid, run_inprocess

from fl_server.run_dir import read_jsonl


def test_the_client_whose_images_darken_is_flagged(tmp_path):
    def nightfall_on_client_1(rnd, grid):
        if rnd != 3:
            return
        images = tmp_path / "runs" / "t" / "data" / "client_1" / "train" / "images"
        for path in images.iterdir():
            img = cv2.imread(str(path))
            path.unlink()  # a symlink into the shared synthetic cache: replace, don't edit
            cv2.imwrite(str(path), (img * 0.25).astype("uint8"))

    grid = InProcessGrid(2)
    grid.on_round = nightfall_on_client_1
    run, _ = run_inprocess(
        tmp_path, ["federation.rounds=3", "drift.enabled=true"], clients=2, grid=grid
    )
    rounds = run.rounds()
    score = {(r["round"], c["id"]): c["drift_score"] for r in rounds for c in r["clients"]}
    threshold = 0.25
    assert score[(1, 0)] == score[(1, 1)] == 0.0  # round 1 is each client's reference
    assert score[(2, 0)] < threshold and score[(2, 1)] < threshold
    assert score[(3, 0)] < threshold < score[(3, 1)], score
    (drift,) = [e for e in read_jsonl(run.events) if e["kind"] == "data_drift"]
    assert drift["round"] == 3 and drift["client"] == 1
    top = max(drift["features"], key=drift["features"].get)
    assert top in ("brightness", "contrast"), drift
