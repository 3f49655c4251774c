"""Build the server and client images (``fedyolo deploy images``, ``make images``).

Both Dockerfiles need BuildKit (``RUN --mount``: wheels are bind-mounted, never a layer). On a
normal machine the images install from the package index (``--torch-index`` for the CPU build of
torch). ``offline=True`` is for machines that reach no image registry and no index from inside a
container (this one): the base is a Debian 12 root file system made with ``debootstrap`` and
imported with ``docker import``, and the wheels come from a wheelhouse built on the host with
``pip wheel`` (``.wheelhouse/``, git-ignored). The two images share their base and core layers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from deploy import DeployError

LOGGER = logging.getLogger("fedyolo")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = PROJECT_ROOT / ".wheelhouse"
LOCAL_BASE = "fedyolo/base:bookworm-py311"
ROLES = ("server", "client")


class ImageError(DeployError):
    """A build that cannot start or failed; the message names the step and the fix."""


def default_tag(role: str) -> str:
    return f"fedyolo-{role}:{version('fedyolo')}"


@dataclass(frozen=True)
class Built:
    role: str
    tag: str
    seconds: float
    size_bytes: int


def docker_cli() -> str:
    """A ``docker`` client that builds with BuildKit.

    ``FEDYOLO_DOCKER`` if set; else the first client on PATH (or Debian's ``/usr/bin/docker``)
    that has the buildx plugin, or is older than 23 (whose ``DOCKER_BUILDKIT=1`` is built in).
    """
    if os.environ.get("FEDYOLO_DOCKER"):
        return os.environ["FEDYOLO_DOCKER"]
    candidates = [c for c in (shutil.which("docker"), "/usr/bin/docker") if c and Path(c).exists()]
    for cli in dict.fromkeys(candidates):
        if _ok([cli, "buildx", "version"]):
            return cli
        out = _out([cli, "version", "--format", "{{.Client.Version}}"])
        if out and out.split(".")[0].isdigit() and int(out.split(".")[0]) < 23:
            return cli
    raise ImageError(
        "no docker client that builds with BuildKit: install the buildx plugin "
        "(docker-buildx-plugin) or set FEDYOLO_DOCKER to a client that has it"
    )


def _ok(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def _out(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def image_exists(tag: str, cli: str | None = None) -> bool:
    return _ok([cli or docker_cli(), "image", "inspect", tag])


SOURCE_LABEL = "io.fedyolo.source"
SOURCE_PARTS = (
    "pyproject.toml",
    "fl_server",
    "fl_client",
    "strategies",
    "tuning",
    "deploy",
    "configs",
)
IGNORED = (".pyc", ".pt", ".key")  # as .dockerignore: never sent to a build


def source_digest(root: Path = PROJECT_ROOT) -> str:
    """sha256 of the source an image installs (what the Dockerfiles copy, less the README):
    an image labelled with another digest runs other code than this checkout's."""
    h = hashlib.sha256()
    for part in SOURCE_PARTS:
        top = root / part
        files = [top] if top.is_file() else sorted(top.rglob("*"))
        for f in files:
            if f.is_file() and "__pycache__" not in f.parts and f.suffix not in IGNORED:
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def image_source(tag: str, cli: str | None = None) -> str:
    """The source digest an image was built from ("" when it has none)."""
    fmt = f'{{{{ index .Config.Labels "{SOURCE_LABEL}" }}}}'
    out = _out([cli or docker_cli(), "image", "inspect", "--format", fmt, tag]) or ""
    return "" if out == "<no value>" else out


def outdated(tags: dict[str, str], cli: str | None = None) -> dict[str, str]:
    """The roles whose image must be built, with why: it does not exist, or it was built
    from other source than this checkout's."""
    cli = cli or docker_cli()
    digest, out = source_digest(), {}
    for role in ROLES:
        if not image_exists(tags[role], cli):
            out[role] = "missing"
        elif image_source(tags[role], cli) != digest:
            out[role] = "built from other source than this checkout's"
    return out


def image_size(tag: str, cli: str | None = None) -> int:
    return int(_out([cli or docker_cli(), "image", "inspect", "--format", "{{.Size}}", tag]) or 0)


def make_local_base(tag: str = LOCAL_BASE, cli: str | None = None) -> float:
    """A Debian 12 image with Python 3.11 from ``debootstrap`` (root only); seconds taken."""
    cli = cli or docker_cli()
    if not shutil.which("debootstrap"):
        raise ImageError("offline base: debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise ImageError(
            "offline base: debootstrap needs root; run `fedyolo deploy images` as root"
        )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedyolo-base-") as root:
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                root,
                "http://deb.debian.org/debian",
            ],
            "debootstrap",
        )
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run([cli, "import", "-", tag], stdin=tar.stdout, capture_output=True)
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise ImageError(f"docker import of the base failed: {imp.stderr.decode()[-400:]}")
    return time.perf_counter() - t0


def requirements(role: str) -> list[str]:
    """The role's pinned requirements, from pyproject.toml (the script the images run)."""
    sys.path.insert(0, str(PROJECT_ROOT / "deploy" / "docker"))
    try:
        import tomllib

        from requirements import requirements as reqs  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as f:
        return reqs(tomllib.load(f), role)


def make_wheelhouse(folder: Path = WHEELHOUSE) -> float:
    """Every wheel both images install, built on the host with ``pip wheel``; seconds taken.

    Skipped (0 s) when the folder already holds the wheels for the current requirements.
    """
    reqs = [*requirements("core"), *requirements("server"), "setuptools==80.9.0"]
    digest = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:16]
    stamp = folder / ".requirements"
    if stamp.exists() and stamp.read_text() == digest:
        return 0.0
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(folder), *reqs],
        "pip wheel (the wheelhouse)",
    )
    for stale in folder.glob("fedyolo-*.whl"):
        stale.unlink()
    stamp.write_text(digest)
    return time.perf_counter() - t0


def build(
    role: str,
    *,
    tag: str | None = None,
    base: str | None = None,
    torch_index: str = "",
    cli: str | None = None,
) -> Built:
    """``docker build -f Dockerfile.<role>`` with BuildKit; the image's tag, seconds and size."""
    if role not in ROLES:
        raise ImageError(f"unknown image role {role!r} (one of {', '.join(ROLES)})")
    cli = cli or docker_cli()
    tag = tag or default_tag(role)
    WHEELHOUSE.mkdir(exist_ok=True)  # the Dockerfiles bind-mount it; empty = use the index
    args = [
        cli,
        "build",
        "--file",
        str(PROJECT_ROOT / f"Dockerfile.{role}"),
        "--tag",
        tag,
        "--build-arg",
        f"VERSION={version('fedyolo')}",
        "--build-arg",
        f"REVISION={_out(['git', '-C', str(PROJECT_ROOT), 'rev-parse', 'HEAD']) or 'unknown'}",
        "--build-arg",
        f"CREATED={dt.datetime.now(dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}",
        "--label",
        f"{SOURCE_LABEL}={source_digest()}",
    ]
    if base:
        args += ["--build-arg", f"BASE_IMAGE={base}"]
    if torch_index:
        args += ["--build-arg", f"TORCH_INDEX_URL={torch_index}"]
    t0 = time.perf_counter()
    _run([*args, str(PROJECT_ROOT)], f"docker build {tag}", env={"DOCKER_BUILDKIT": "1"})
    return Built(role, tag, time.perf_counter() - t0, image_size(tag, cli))


def build_images(
    *,
    offline: bool = False,
    base: str | None = None,
    torch_index: str = "",
    roles: tuple[str, ...] = ROLES,
    tags: dict[str, str] | None = None,
) -> list[Built]:
    """Both images (server first: the client then reuses the shared layers)."""
    cli = docker_cli()
    if offline:
        base = base or LOCAL_BASE
        if not image_exists(base, cli):
            LOGGER.info("offline: making the local base %s with debootstrap", base)
            LOGGER.info("local base in %.0f s", make_local_base(base, cli))
        LOGGER.info("offline: the wheelhouse in %s", WHEELHOUSE)
        LOGGER.info("wheelhouse ready in %.0f s", make_wheelhouse())
    out = []
    for role in roles:
        LOGGER.info("building %s", (tags or {}).get(role) or default_tag(role))
        out.append(
            build(
                role,
                tag=(tags or {}).get(role),
                base=base,
                torch_index=torch_index,
                cli=cli,
            )
        )
    return out


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=PROJECT_ROOT,
    )
    if done.returncode != 0:
        raise ImageError(
            f"{what} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}"
        )
