"""``fl_client.lazy``: the one way fedyolo imports a heavy optional dependency on first use
(issue 29, item 5): ``fedyolo --help`` and the packages' imports stay free of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fl_client.lazy import HEAVY, LazyModule, lazy

ROOT = Path(__file__).resolve().parents[2]


def test_a_lazy_module_is_imported_at_its_first_use_and_is_then_the_real_one():
    code = """
import json, sys
from fl_client.lazy import lazy
optuna = lazy("optuna")
before = "optuna" in sys.modules
create = optuna.create_study
import optuna as real
print(json.dumps([before, "optuna" in sys.modules, create is real.create_study]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, True, True]


def test_an_imported_module_is_returned_as_it_is(monkeypatch):
    already = ModuleType("torch")  # stands for torch, imported before
    monkeypatch.setitem(sys.modules, "torch", already)
    assert lazy("torch") is already


def test_a_missing_package_raises_where_it_is_used_not_where_it_is_named():
    missing = lazy("torch.no_such_module_here")
    assert isinstance(missing, LazyModule)
    with pytest.raises(ModuleNotFoundError):
        missing.anything  # noqa: B018 - the access is the test


def test_only_heavy_dependencies_are_lazy():
    assert {"torch", "ultralytics", "clearml", "optuna", "boto3", "docker", "onnxruntime"} <= HEAVY
    with pytest.raises(ValueError, match="only heavy dependencies"):
        lazy("yaml")
    with pytest.raises(ValueError, match="only heavy dependencies"):
        lazy("fl_server.config")
