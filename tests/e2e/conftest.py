"""The container tier's fixtures: a Docker engine that answers, and the images built once.

The tier runs when a Docker engine answers; otherwise its tests are skipped with the reason. CI
sets ``FEDYOLO_REQUIRE_DOCKER=1`` (``.ci/run`` installs and starts the engine), and then a missing
engine is a failure, not a skip. Missing images are built once per session: from the registry
and the index, or offline (local base + wheelhouse) when ``FEDYOLO_IMAGES_OFFLINE=1`` or when the
online build fails where an offline one can be made.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _engine_problem() -> str | None:
    try:
        from deploy.images import docker_cli

        cli = docker_cli()
    except Exception as e:  # no client at all
        return f"no docker client ({e})"
    done = subprocess.run([cli, "info", "--format", "{{.ServerVersion}}"], capture_output=True)
    if done.returncode != 0:
        return f"no Docker engine answers ({done.stderr.decode().strip()[-200:]})"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> str:
    problem = _engine_problem()
    if problem:
        if os.environ.get("FEDYOLO_REQUIRE_DOCKER") == "1":
            pytest.fail(f"the container tier is required here but {problem}")
        pytest.skip(f"container tier skipped: {problem}")
    from deploy.images import docker_cli

    return docker_cli()


@pytest.fixture(scope="session")
def images(docker_engine) -> dict[str, str]:
    from deploy.images import ROLES, ImageError, build_images, default_tag, outdated

    tags = {r: default_tag(r) for r in ROLES}
    missing = tuple(outdated(tags, docker_engine))  # missing, or built from other source
    if missing:
        wanted = os.environ.get("FEDYOLO_IMAGES_OFFLINE")
        if wanted is not None:
            build_images(offline=wanted == "1", roles=missing)
        else:  # from the registry and index if they answer, else the offline way
            try:
                build_images(offline=False, roles=missing)
            except ImageError as e:
                if not (shutil.which("debootstrap") and os.geteuid() == 0):
                    raise
                print(f"online image build failed ({str(e)[:200]}); building offline")
                build_images(offline=True, roles=missing)
    return tags


# pytest-timeout counts a test's setup, and the images are built once per session, in the setup
# of the first test that asks for them: from nothing that is a local base, a wheelhouse and two
# images (5-7 min on 2 cores, longer beside make test's other tier). A CI run once failed on it:
# the EC2 rehearsal's 492 s plus the 411 s image build in its setup passed the 900 s limit
# (2026-12-06). So every test that uses the images gets this much more than its own limit.
IMAGE_BUILD_ALLOWANCE_S = 1200


def pytest_collection_modifyitems(config, items):
    default = config.getoption("timeout", None) or config.getini("timeout") or 0
    for item in items:
        if "images" not in getattr(item, "fixturenames", ()):
            continue
        own = item.get_closest_marker("timeout")
        base = float(own.args[0]) if own and own.args else float(default)
        if base > 0:  # 0: no limit at all
            item.add_marker(pytest.mark.timeout(base + IMAGE_BUILD_ALLOWANCE_S), append=False)
