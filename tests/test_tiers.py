"""``make test``'s runner (tests/tiers.py): both tiers' verdicts decide its exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).with_name("tiers.py")


def _tiers(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_failing_test_in_one_tier_fails_the_run_and_each_line_names_its_tier(tmp_path):
    (tmp_path / "test_one.py").write_text(
        "import pytest\n"
        "def test_fails():\n    assert 1 == 2\n"
        "@pytest.mark.e2e\ndef test_passes():\n    pass\n"
    )
    done = _tiers(str(tmp_path / "test_one.py"))
    assert done.returncode == 1, done.stdout
    assert "tier e2e (-m 'e2e'): passed" in done.stdout
    assert "tier in-process (-m 'not e2e'): FAILED (pytest exit status 1)" in done.stdout
    assert "[in-process] FAILED" in done.stdout and "[       e2e] 1 passed" in done.stdout


def test_a_narrowed_run_may_leave_one_tier_empty_but_not_both(tmp_path):
    (tmp_path / "test_two.py").write_text("def test_passes():\n    pass\n")
    one = _tiers(str(tmp_path / "test_two.py"))
    assert one.returncode == 0, one.stdout
    assert "tier e2e (-m 'e2e'): collected no tests in" in one.stdout
    none = _tiers(str(tmp_path / "test_two.py"), "-k", "nothing_matches")
    assert none.returncode == 1, none.stdout
    assert none.stdout.count("collected no tests: a failure") == 2
