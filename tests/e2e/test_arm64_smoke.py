"""The arm64 client's fast check (``deploy/arm64_smoke.py``): its packages, as the image gets them,
import and train a step of the tiny model in an aarch64 Python 3.11 under qemu, without Docker.

The fast form of the opt-in arm64 tier (``tests/e2e/test_arm64_client.py``: the image built under
emulation and a compose round, ~25 min), required in CI. Runs where ``debootstrap``, ``dpkg-deb``
and ``qemu-aarch64-static`` are installed and the user is root; otherwise skipped with the reason,
or a failure with ``FEDYOLO_REQUIRE_ARM64_SMOKE=1`` (``.ci/run`` installs them). The aarch64 root
and packages are cached under ``~/.cache/fedyolo/arm64-smoke/``: a first run makes them (the
mirror and the wheels' index must answer), a later one only runs the probe.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from deploy import arm64_smoke
from deploy.images import LOCK_ARM64

pytestmark = pytest.mark.e2e


def _locked(name: str) -> str:
    pins = dict(ln.split("==", 1) for ln in LOCK_ARM64.read_text().splitlines() if "==" in ln)
    return pins[name]


def test_the_arm64_client_imports_and_trains_a_step_on_aarch64():
    problem = arm64_smoke.missing()
    if problem:
        if os.environ.get("FEDYOLO_REQUIRE_ARM64_SMOKE") == "1":
            pytest.fail(f"the arm64 smoke is required here but {problem}")
        pytest.skip(f"arm64 smoke skipped: {problem}")
    result = arm64_smoke.smoke()
    print(f"arm64 smoke: {result}")
    assert result["machine"] == "aarch64"
    # the image's packages, not the host's: the lock's torch (a CPU build) and Ultralytics
    assert result["torch"].split("+")[0] == _locked("torch") and result["cuda"] is None
    assert result["ultralytics"] == _locked("ultralytics") and result["flwr"] == _locked("flwr")
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert 0 < result["changed_tensors"] <= result["tensors"]


def test_the_probe_refuses_an_interpreter_that_is_not_aarch64():
    """The probe's first check is the machine: on this host (not aarch64) it fails, so a smoke
    that ran the host's Python by mistake cannot pass."""
    if arm64_smoke.platform.machine() == "aarch64":
        pytest.skip("this host is aarch64")
    done = subprocess.run(
        [sys.executable, "-m", "deploy.arm64_smoke", "--probe"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "not aarch64" in done.stderr
