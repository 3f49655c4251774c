"""A study on a real PostgreSQL server: the storage workers on several machines share.

The server comes from ``FEDYOLO_PG_URL`` (an SQLAlchemy URL, e.g.
``postgresql+psycopg://fedyolo:fedyolo@127.0.0.1:5432/fedyolo``). Without it the test is
skipped with that reason; with ``FEDYOLO_REQUIRE_POSTGRES=1`` (``.ci/run``, which installs and
starts Debian's ``postgresql``) a missing server is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import RetryFailedTrialCallback
from testkit import TINY_BASE

from deploy.local import kill_tree

pytestmark = pytest.mark.e2e

SPACE = {"train.lr0": {"type": "float", "low": 0.005, "high": 0.05, "log": True}}


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = os.environ.get("FEDYOLO_PG_URL", "")
    why = "FEDYOLO_PG_URL is not set (a PostgreSQL server for the RDB study test)"
    if url:
        try:
            import sqlalchemy

            with sqlalchemy.create_engine(url).connect():
                pass
        except Exception as e:  # noqa: BLE001 - any reason the server is not usable
            why = f"PostgreSQL at FEDYOLO_PG_URL is not reachable: {type(e).__name__}: {e}"
            url = ""
    if not url:
        if os.environ.get("FEDYOLO_REQUIRE_POSTGRES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return url


def test_a_killed_workers_trial_is_failed_as_stale_and_run_again(tmp_path, pg_url):
    """Worker 1 is SIGKILLed inside trial 0's federation; worker 2, the same command, finds the
    trial's heartbeat stale, fails it, re-runs it with the same values (Optuna's
    RetryFailedTrialCallback) and completes the study: 2 trials counted, none lost."""
    name = f"pg-{uuid.uuid4().hex[:10]}"  # the database outlives the test
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    args = [
        "tune",
        *TINY_BASE,
        "federation.clients=2",
        "federation.rounds=3",
        "data.synth.images=96",
        "tracking.enabled=false",
        f"output.dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"tuning.study={name}",
        f"tuning.space={space}",
        f"tuning.storage='{pg_url}'",  # quoted: a URL may hold ? & = (Hydra's grammar)
        "tuning.trials=2",
        "tuning.pruner=none",
        "tuning.heartbeat_interval=1",
        "tuning.grace_period=4",
    ]
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fl_server.cli", *args]
    metrics = tmp_path / "runs" / name / "trials" / "0000" / "metrics.jsonl"
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 600
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert first.poll() is None, "the first worker ended before trial 0's first round"
            assert time.monotonic() < deadline, "trial 0 finished no round in 600 s"
            time.sleep(0.5)
    finally:
        kill_tree(first.pid)  # the worker, its federation's Ray and workers: mid-trial
    study = optuna.load_study(study_name=name, storage=pg_url)
    (stale,) = study.get_trials()
    assert stale.state.name == "RUNNING"  # what a dead worker leaves behind

    time.sleep(5)  # more than tuning.grace_period without a heartbeat
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]

    trials = optuna.load_study(study_name=name, storage=pg_url).get_trials()
    states = {t.number: t.state.name for t in trials}
    assert states == {0: "FAIL", 1: "COMPLETE", 2: "COMPLETE"}, states
    retry = trials[1]
    assert RetryFailedTrialCallback.retried_trial_number(retry) == 0
    assert retry.params == stale.params  # the same values, run again
    assert RetryFailedTrialCallback.retried_trial_number(trials[2]) is None
    for t in trials[1:]:
        run_dir = Path(t.user_attrs["run_dir"])
        assert (run_dir / "summary.json").is_file() and t.user_attrs["rounds"] == 3
    assert "trial 1 of 2 (re-run of trial 0, whose worker died)" in second.stderr
