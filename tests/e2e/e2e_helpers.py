"""Helpers for end-to-end runs of a tiny federation through the real `fedyolo` command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from testkit import TINY_BASE

TINY = [*TINY_BASE, "federation.clients=2", "federation.rounds=2", "data.synth.images=96"]


def tiny_run_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    """`fedyolo run` arguments for the tiny federation, writing under ``tmp_path``."""
    return [
        "run",
        *TINY,
        f"name={name}",
        f"output.dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


def start_fedyolo(args: list[str], cwd: Path, *, ctrl_c: bool = False, **popen) -> subprocess.Popen:
    """``fedyolo`` in the background, in its own process group (kill it with ``os.killpg``).

    ``ctrl_c``: give the child Ctrl-C back (a shell without job control, as under ``make``,
    starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN).
    """
    import signal

    return subprocess.Popen(
        [sys.executable, "-m", "fl_server.cli", *args],
        cwd=cwd,
        env={**os.environ, "YOLO_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        stdout=popen.pop("stdout", subprocess.DEVNULL),
        stderr=popen.pop("stderr", subprocess.DEVNULL),
        start_new_session=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if ctrl_c else None,
        **popen,
    )


def fedyolo(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fl_server.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_run_dir(
    run: Path, rounds: int, clients: int, kept_state: bool = False, momentum: bool = False
) -> list[dict]:
    """The run-directory contract, asserted on real results.

    ``kept_state``: the run keeps per-client arrays (local parts, transport residual), so from
    round 2 on every client must report that its Flower context.state came back.
    ``momentum``: a ``train.keep_momentum`` run, so from round 2 on every client's optimiser
    must have resumed its last round's state (``momentum_kept``).
    """
    for name in (
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
        "events.jsonl",
        "summary.json",
        "summary.md",
        "metrics.png",
        "best.pt",
        "last.pt",
    ):
        assert (run / name).is_file(), f"missing {name}"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(1, rounds + 1))
    manifest = json.loads((run / "manifest.json").read_text())
    train_counts = {c["id"]: c["train_images"] for c in manifest["data"]["clients"]}
    assert manifest["data"]["data_version"] and manifest["seed"] == 0
    for r in lines:
        for k in ("map50", "map50_95", "precision", "recall", "round_seconds"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r[k])
        assert len(r["clients"]) == clients
        for c in r["clients"]:
            # num_examples is the real shard size, not a constant
            assert c["num_examples"] == train_counts[c["id"]]
            assert c["bytes_up"] > 100_000 and c["bytes_down"] > 100_000
            assert c["train_seconds"] > 0 and math.isfinite(c["loss"])
            assert c["kept_state"] == int(kept_state and r["round"] > 1), (r["round"], c)
            if momentum:
                assert c["momentum_kept"] == int(r["round"] > 1), (r["round"], c)
            else:
                assert "momentum_kept" not in c, c
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    digests = [e["weights_sha256"] for e in events if e["kind"] == "initial_eval"]
    digests += [r["weights_sha256"] for r in lines]
    assert len(set(digests)) == rounds + 1, "the global weights did not change every round"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds
    initial = [{"round": 0, **e} for e in events if e["kind"] == "initial_eval"]
    best = max(initial + lines, key=lambda r: r["map50_95"])  # ties: the earlier round
    assert summary["best"]["round"] == best["round"]
    return lines


def check_best_reevaluates(run: Path, workdir: Path, imgsz: int = 64) -> dict:
    """``best.pt`` is a plain Ultralytics checkpoint: it loads, predicts, and its mAP on the
    held-out set is the one the run reported. Returns the re-evaluation."""
    import numpy as np
    from ultralytics import YOLO

    from fl_client.evaluate import evaluate_checkpoint

    model = YOLO(str(run / "best.pt"))
    img = next((run / "data" / "server_val" / "images").iterdir())
    pred = model.predict(str(img), imgsz=imgsz, device="cpu", verbose=False)
    assert len(pred) == 1 and pred[0].boxes is not None
    assert model.names == {0: "car", 1: "pedestrian", 2: "cyclist", 3: "traffic_sign"}
    summary = json.loads((run / "summary.json").read_text())
    res = evaluate_checkpoint(
        run / "best.pt",
        run / "data" / "server_val" / "data.yaml",
        imgsz=imgsz,
        batch=16,
        device="cpu",
        workdir=workdir,
    )
    np.testing.assert_allclose(res["map50_95"], summary["best"]["map50_95"], atol=1e-6)
    return res


def check_interrupted(run: Path) -> int:
    """A run stopped by Ctrl-C/SIGTERM tells the truth: ``interrupted``, no invented failures,
    every finished round recorded once. Returns the rounds it completed."""
    from fl_server.run_dir import read_jsonl

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    done = summary["rounds_completed"]
    events = read_jsonl(run / "events.jsonl")
    assert not [e for e in events if e["kind"] in ("client_failed", "round_failed")], events
    assert events[-1]["kind"] == "run_end" and events[-1]["status"] == "interrupted"
    assert [r["round"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, done + 1))
    return done


def wait_for_rounds(run: Path, n: int, proc: subprocess.Popen, timeout: float = 400) -> None:
    """Wait until ``n`` rounds are in metrics.jsonl; fail if fedyolo exits or time runs out."""
    import time

    import pytest

    from fl_server.run_dir import read_jsonl

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(read_jsonl(run / "metrics.jsonl")) >= n:
            return
        assert proc.poll() is None, f"fedyolo exited ({proc.returncode}) before round {n}"
        time.sleep(0.2)
    pytest.fail(f"round {n} did not finish in {timeout:.0f} s")
