"""The linux/arm64 client image (edge devices, Graviton): built, then joining an x86_64
SuperLink in a compose federation and training a round, under emulation on an x86_64 host.

Opt-in (``FEDYOLO_ARM64=1``): from scratch, the arm64 base and image take ~25 min under
emulation here, too long for CI, which requires the fast form instead
(``tests/e2e/test_arm64_smoke.py``: the client's packages import and train a step on aarch64
under qemu, no image, no Docker). Runs when a Docker engine answers and this machine runs arm64
binaries (natively, or through qemu-user-static registered with binfmt_misc); otherwise skipped
with the reason. ``FEDYOLO_REQUIRE_ARM64=1`` makes a missing piece a failure, not a skip. The image
is built when missing or built from other source (offline when ``FEDYOLO_IMAGES_OFFLINE=1``).
``FEDYOLO_ARM64_CLIENT`` / ``FEDYOLO_ARM64_SERVER`` name other tags to use as they are.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
from e2e_helpers import check_best_reevaluates, check_run_dir, fedyolo, tiny_run_args

pytestmark = [pytest.mark.e2e, pytest.mark.containers]

LIMIT_BYTES = 2_500_000_000  # the budget for the edge image


def _arm64_problem() -> str | None:
    if "1" not in (os.environ.get("FEDYOLO_ARM64"), os.environ.get("FEDYOLO_REQUIRE_ARM64")):
        return "opt-in: FEDYOLO_ARM64=1 (an arm64 build under emulation takes ~25 min here)"
    if platform.machine() in ("aarch64", "arm64"):
        return None
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return (
            "this x86_64 host runs no arm64 binaries: no binfmt_misc entry for qemu-aarch64 "
            "(as root: apt-get install qemu-user-static binfmt-support)"
        )
    return None


@pytest.fixture(scope="module")
def arm64_client(docker_engine) -> str:
    problem = _arm64_problem()
    if problem:
        if os.environ.get("FEDYOLO_REQUIRE_ARM64") == "1":
            pytest.fail(f"the arm64 client tier is required here but {problem}")
        pytest.skip(f"arm64 client tier skipped: {problem}")
    from deploy.images import build_images, default_tag, image_exists, image_source, source_digest

    if os.environ.get("FEDYOLO_ARM64_CLIENT"):
        return os.environ["FEDYOLO_ARM64_CLIENT"]
    tag = default_tag("client", "linux/arm64")
    if not image_exists(tag, docker_engine) or image_source(tag, docker_engine) != source_digest():
        offline = os.environ.get("FEDYOLO_IMAGES_OFFLINE", "1") == "1"
        build_images(offline=offline, platform="linux/arm64", tags={"client": tag})
    return tag


@pytest.fixture(scope="module")
def x86_server(request) -> str:
    if os.environ.get("FEDYOLO_ARM64_SERVER"):
        return os.environ["FEDYOLO_ARM64_SERVER"]
    return request.getfixturevalue("images")["server"]


def _inspect(cli: str, fmt: str, tag: str) -> str:
    done = subprocess.run([cli, "image", "inspect", "--format", fmt, tag], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout.strip()


def test_arm64_client_image_is_small_cpu_only_and_records_its_build(docker_engine, arm64_client):
    assert _inspect(docker_engine, "{{.Architecture}}", arm64_client) == "arm64"
    size = int(_inspect(docker_engine, "{{.Size}}", arm64_client))
    assert size <= LIMIT_BYTES, f"{size / 1e9:.2f} GB"
    labels = json.loads(_inspect(docker_engine, "{{json .Config.Labels}}", arm64_client))
    assert not [k for k in labels if "created" in k], labels
    assert (
        labels["io.fedyolo.base.suite"] == "bookworm" and labels["io.fedyolo.base.arch"] == "arm64"
    )
    probe = (
        "import importlib.util as u, os, platform, torch, cv2, fl_client.client_app; "
        "print(os.getuid(), platform.machine(), torch.__version__, torch.cuda.is_available(), "
        "cv2.__version__, [m for m in ('ray', 'optuna', 'boto3', 'onnx', 'clearml', 'docker', "
        "'triton', 'fl_server', 'tuning', 'deploy.aws') if u.find_spec(m.split('.')[0]) "
        "and (m != 'deploy.aws' or u.find_spec(m))]); "
        "print(open('/opt/fedyolo/build/pip-freeze.txt').read().count('=='), "
        "open('/opt/fedyolo/build/dpkg.txt').read().count('='))"
    )
    done = subprocess.run(
        [docker_engine, "run", "--rm", "--entrypoint", "python3", arm64_client, "-c", probe],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = done.stdout.strip().splitlines()[-2:]
    assert first.startswith("10001 aarch64 2.10.0+cpu False ") and first.endswith(" []"), first
    pins, debs = map(int, second.split())
    assert pins > 50 and debs > 50, second


def test_arm64_client_trains_a_round_with_an_x86_64_superlink(
    tmp_path, docker_engine, arm64_client, x86_server
):
    """One round, one arm64 client, under emulation: the run-directory contract, and the
    container's best.pt re-evaluates on the host to the mAP the run reported."""
    run = tmp_path / "runs" / "edge"
    args = tiny_run_args(
        tmp_path, "edge", "engine=compose", "engine.offline=true", "engine.build=never",
        f"engine.client_image={arm64_client}", "engine.client_platform=linux/arm64",
        f"engine.server_image={x86_server}",
        "federation.clients=1", "federation.rounds=1", "federation.round_timeout=1500",
        "data.synth.images=48",
    )  # fmt: skip
    proc = fedyolo(args, cwd=tmp_path, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rounds = check_run_dir(run, rounds=1, clients=1)
    # the client container ran the arm64 image (its architecture asserted above)
    assert f"FEDYOLO_CLIENT_IMAGE={arm64_client}" in (run / "compose.env").read_text()
    assert _inspect(docker_engine, "{{.Architecture}}", arm64_client) == "arm64"
    check_best_reevaluates(run, tmp_path / "val")
    print(f"arm64 round under emulation: {rounds[0]['round_seconds']:.0f} s, "
          f"client training {rounds[0]['clients'][0]['train_seconds']:.0f} s")  # fmt: skip
