from __future__ import annotations

import sys
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).parent))  # the in-process federation helper


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Flower stamps messages with the running task's identity; give the tests one.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
