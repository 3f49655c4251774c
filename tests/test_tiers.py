"""``make test``'s runner (tests/tiers.py): each tier runs its own tests, and both tiers'
verdicts decide the exit status."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).with_name("tiers.py")
# what tests/conftest.py does, for test files outside tests/
CONFTEST = (
    f"import sys\nsys.path.insert(0, {str(RUNNER.parent)!r})\n"
    "from tiers import pytest_collection_modifyitems  # noqa: F401\n"
)


def _tiers(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_each_tier_runs_its_own_tests_and_a_failure_in_one_fails_the_run(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "test_end_to_end.py").write_text("def test_passes():\n    pass\n")
    (tmp_path / "test_unit.py").write_text("def test_fails():\n    assert 1 == 2\n")
    done = _tiers(str(tmp_path))
    assert done.returncode == 1, done.stdout
    assert "tier e2e: passed" in done.stdout, done.stdout
    assert "tier rest: FAILED (pytest exit status 1)" in done.stdout, done.stdout
    # a line per e2e test, each prefixed with its tier; each tier deselected the other's test
    e2e = r"^\[ e2e\] \S*/e2e/test_end_to_end\.py::test_passes PASSED"
    assert re.search(e2e, done.stdout, re.M), done.stdout
    assert re.search(r"^\[rest\] FAILED \S*/test_unit\.py::test_fails", done.stdout, re.M)
    assert re.search(r"^\[ e2e\] =* ?1 passed, 1 deselected in", done.stdout, re.M)
    assert re.search(r"^\[rest\] =* ?1 failed, 1 deselected in", done.stdout, re.M)


def test_a_narrowed_run_may_leave_one_tier_empty_but_not_both(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_unit.py").write_text("def test_passes():\n    pass\n")
    one = _tiers(str(tmp_path / "test_unit.py"))
    assert one.returncode == 0, one.stdout
    assert "tier e2e: collected no tests in" in one.stdout and "tier rest: passed" in one.stdout
    none = _tiers(str(tmp_path / "test_unit.py"), "-k", "nothing_matches")
    assert none.returncode == 1, none.stdout
    assert none.stdout.count("collected no tests: a failure") == 2
