"""Build the server and client images (``fedyolo deploy images``, ``make images``).

Both Dockerfiles need BuildKit (``RUN --mount``: wheels are bind-mounted, never a layer). On a
normal machine the images install from the package index (``--torch-index`` for the CPU build of
torch). ``offline=True`` is for machines that reach no image registry and no index from inside a
container (this one): the base is a Debian 12 root file system made with ``debootstrap`` and
imported with ``docker import``, and the wheels come from a wheelhouse built on the host with
``pip wheel`` (``.wheelhouse/``, git-ignored). The two images share their base and core layers.

``platform="linux/arm64"`` builds the client for edge devices and Graviton (the server stays
x86_64): offline, its base is ``debootstrap --arch arm64`` and its wheels, pinned in
``deploy/docker/lock-arm64.txt``, are downloaded for aarch64 into ``.wheelhouse/arm64/``; the
build's steps run under emulation (qemu-user-static and binfmt_misc on an x86_64 host).

Both Dockerfiles are rendered from one definition: ``deploy/docker/stages.Dockerfile`` (the
base, requirements, wheel and core stages) inside ``deploy/docker/<role>.Dockerfile``.
Same source, same image: the labels carry no build time, so rebuilding unchanged source with
the build cache gives the same image ID; an image a rebuild untags is removed, not left
dangling.
"""

from __future__ import annotations

import hashlib
import json
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
DOCKER_DIR = PROJECT_ROOT / "deploy" / "docker"
LOCK_ARM64 = DOCKER_DIR / "lock-arm64.txt"
# Every package of both x86_64 images (direct and indirect), resolved by pip on this platform:
# the wheelhouse, the images and `make venv` (the tested environment) install under it.
LOCK_AMD64 = DOCKER_DIR / "lock-amd64.txt"
LOCK_AMD64_HEAD = (
    "# Every package of the x86_64 images, direct and indirect (pip's resolver on x86_64, Python",
    "# 3.11): the wheelhouse, the images and `make venv` install under it as a constraint file.",
    "# `fedyolo deploy images --relock` rewrites it from pyproject.toml's pins.",
)
# Docker platform -> TARGETARCH; which roles it builds; the Debian architecture.
PLATFORMS = {"linux/amd64": "amd64", "linux/arm64": "arm64"}
PLATFORM_ROLES = {"linux/amd64": ROLES, "linux/arm64": ("client",)}
DEBIAN_SUITE, DEBIAN_MIRROR = "bookworm", "http://deb.debian.org/debian"
# pip's --platform tags for the aarch64 wheels (Debian 12: glibc 2.36)
AARCH64_TAGS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64",
                "manylinux_2_34_aarch64", "linux_aarch64")  # fmt: skip


class ImageError(DeployError):
    """A build that cannot start or failed; the message names the step and the fix."""


def default_tag(role: str, platform: str = "linux/amd64") -> str:
    arch = PLATFORMS[check_platform(platform)]
    return f"fedyolo-{role}:{version('fedyolo')}" + ("" if arch == "amd64" else f"-{arch}")


def check_platform(platform: str) -> str:
    if platform not in PLATFORMS:
        raise ImageError(f"unknown image platform {platform!r} (one of {', '.join(PLATFORMS)})")
    return platform


def local_base(platform: str = "linux/amd64") -> str:
    arch = PLATFORMS[check_platform(platform)]
    return LOCAL_BASE + ("" if arch == "amd64" else f"-{arch}")


def render_dockerfile(role: str) -> str:
    """``Dockerfile.<role>``: the role's file with the shared stages in place of ``#@stages``."""
    stages = (DOCKER_DIR / "stages.Dockerfile").read_text()
    text = (DOCKER_DIR / f"{role}.Dockerfile").read_text().replace("#@stages\n", stages)
    head = (
        f"# GENERATED from deploy/docker/{role}.Dockerfile and deploy/docker/stages.Dockerfile"
        " (the stages both images share): edit those; `fedyolo deploy images` rewrites this.\n"
    )
    return head + text


def write_dockerfiles(root: Path = PROJECT_ROOT) -> list[str]:
    """Rewrite the top-level Dockerfiles that differ from their definition; the ones written."""
    out = []
    for role in ROLES:
        path = root / f"Dockerfile.{role}"
        text = render_dockerfile(role)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            out.append(path.name)
    return out


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


def outdated(
    tags: dict[str, str], cli: str | None = None, platforms: dict[str, str] | None = None
) -> dict[str, str]:
    """The roles whose image must be built, with why: it does not exist, it was built for
    another platform than ``platforms[role]`` (default linux/amd64), or from other source
    than this checkout's."""
    cli = cli or docker_cli()
    digest, out = source_digest(), {}
    for role in ROLES:
        want = PLATFORMS[check_platform((platforms or {}).get(role, "linux/amd64"))]
        if not image_exists(tags[role], cli):
            out[role] = "missing"
        elif (got := image_arch(tags[role], cli)) != want:
            out[role] = f"built for linux/{got}, not linux/{want}"
        elif image_source(tags[role], cli) != digest:
            out[role] = "built from other source than this checkout's"
    return out


def image_arch(tag: str, cli: str | None = None) -> str:
    """The image's architecture as Docker names it (amd64, arm64)."""
    return _out([cli or docker_cli(), "image", "inspect", "--format", "{{.Architecture}}", tag])


def image_id(tag: str, cli: str | None = None) -> str:
    return _out([cli or docker_cli(), "image", "inspect", "--format", "{{.Id}}", tag])


def remove_if_dangling(image: str, cli: str) -> bool:
    """Remove an image a rebuild untagged (no tag left; unused by containers): True if done."""
    tags = _out([cli, "image", "inspect", "--format", "{{len .RepoTags}}", image])
    return tags == "0" and _ok([cli, "image", "rm", image])


def source_revision(root: Path = PROJECT_ROOT) -> str:
    """The last commit that changed what an image installs (not HEAD: a docs commit must not
    change the image's labels, hence its ID); "unknown" outside a git checkout."""
    parts = [*SOURCE_PARTS, "Dockerfile.client", "Dockerfile.server"]
    return _out(["git", "-C", str(root), "log", "-1", "--format=%H", "--", *parts]) or "unknown"


def image_size(tag: str, cli: str | None = None) -> int:
    return int(_out([cli or docker_cli(), "image", "inspect", "--format", "{{.Size}}", tag]) or 0)


def make_local_base(
    tag: str = LOCAL_BASE, cli: str | None = None, platform: str = "linux/amd64"
) -> float:
    """A Debian 12 image with Python 3.11 from ``debootstrap`` (root only); seconds taken.

    What it was made from is in its labels (inherited by the images built on it): the suite,
    mirror, architecture and the date of the mirror's Release file. The mirror is the live
    one (snapshot.debian.org is not reachable here), so the date is what pins it; the exact
    package versions are listed in each image's ``/opt/fedyolo/build/dpkg.txt``.
    """
    cli = cli or docker_cli()
    arch = PLATFORMS[check_platform(platform)]
    if not shutil.which("debootstrap"):
        raise ImageError("offline base: debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise ImageError(
            "offline base: debootstrap needs root; run `fedyolo deploy images` as root"
        )
    if arch != "amd64" and not Path(f"/proc/sys/fs/binfmt_misc/qemu-{_qemu(arch)}").exists():
        raise ImageError(
            f"offline {platform} base: no binfmt_misc entry for qemu-{_qemu(arch)}; as root: "
            "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
            "apt-get install qemu-user-static binfmt-support"
        )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedyolo-base-") as root:
        _run(
            [
                "debootstrap",
                f"--arch={arch}",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                DEBIAN_SUITE,
                root,
                DEBIAN_MIRROR,
            ],
            "debootstrap",
        )
        labels = {
            "io.fedyolo.base.suite": DEBIAN_SUITE,
            "io.fedyolo.base.mirror": DEBIAN_MIRROR,
            "io.fedyolo.base.arch": arch,
            "io.fedyolo.base.release-date": _release_date(Path(root)),
        }
        import_base(Path(root), tag, platform, labels, cli)
    return time.perf_counter() - t0


def _qemu(arch: str) -> str:
    return {"arm64": "aarch64"}.get(arch, arch)


def _release_date(root: Path) -> str:
    for f in sorted((root / "var/lib/apt/lists").glob("*Release")):
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("Date:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def import_base(root: Path, tag: str, platform: str, labels: dict[str, str], cli: str) -> None:
    """A root file system as image ``tag`` for ``platform``, with ``labels``. Built ``FROM
    scratch`` rather than ``docker import``ed: Docker 20.10's import ignores ``--platform``
    and records the host's architecture, which BuildKit then refuses to build arm64 upon."""
    with tempfile.TemporaryDirectory(prefix="fedyolo-base-ctx-") as ctx:
        _run(["tar", "-C", str(root), "-cf", f"{ctx}/rootfs.tar", "."], "tar of the base")
        label = " ".join(f'{k}="{v}"' for k, v in labels.items())
        Path(ctx, "Dockerfile").write_text(
            f'FROM scratch\nADD rootfs.tar /\nLABEL {label}\nCMD ["/bin/bash"]\n'
        )
        _run(
            [cli, "build", "--quiet", "--platform", platform, "--tag", tag, ctx],
            f"docker build of the base {tag}",
            env={"DOCKER_BUILDKIT": "1"},
        )


def requirements(role: str, arch: str = "amd64") -> list[str]:
    """The role's pinned requirements, from pyproject.toml (the script the images run)."""
    sys.path.insert(0, str(DOCKER_DIR))
    try:
        import tomllib

        from requirements import requirements as reqs  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as f:
        return reqs(tomllib.load(f), role, arch)


def make_wheelhouse(folder: Path = WHEELHOUSE, platform: str = "linux/amd64") -> float:
    """Every wheel the platform's images install, fetched on the host; seconds taken.

    amd64: ``pip wheel`` of both roles' requirements into ``folder``. arm64: the client's
    locked set (``deploy/docker/lock-arm64.txt``) downloaded for aarch64 into ``folder/arm64``.
    Skipped (0 s) when the folder already holds the wheels for the current requirements.
    """
    if PLATFORMS[check_platform(platform)] == "arm64":
        return _arm64_wheelhouse(folder / "arm64")
    reqs = _amd64_requirements()
    lock = LOCK_AMD64.read_text()
    digest = hashlib.sha256("\n".join([*reqs, lock]).encode()).hexdigest()[:16]
    stamp = folder / ".requirements"
    if stamp.exists() and stamp.read_text() == digest:
        return 0.0
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--wheel-dir",
            str(folder),
            "--constraint",
            str(LOCK_AMD64),
            *reqs,
        ],
        "pip wheel (the wheelhouse)",
    )
    for stale in folder.glob("fedyolo-*.whl"):
        stale.unlink()
    _write_new(stamp, digest)
    return time.perf_counter() - t0


def _amd64_requirements() -> list[str]:
    """What the x86_64 wheelhouse holds: both roles and the headless OpenCV."""
    return [
        *requirements("core"),
        *requirements("headless"),
        *requirements("server"),
        "setuptools==80.9.0",
    ]


def _arm64_wheelhouse(folder: Path) -> float:
    lock = LOCK_ARM64.read_text()
    digest = hashlib.sha256(lock.encode()).hexdigest()[:16]
    stamp = folder / ".requirements"
    if stamp.exists() and stamp.read_text() == digest:
        return 0.0
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tags = [a for t in AARCH64_TAGS for a in ("--platform", t)]
    _run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *tags,
         "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
         "--dest", str(folder), "--requirement", str(LOCK_ARM64)],
        "pip download (the aarch64 wheelhouse)",
        env={"PIP_CONSTRAINT": ""},  # the host's torch cap is for its own store
    )  # fmt: skip
    _write_new(stamp, digest)
    return time.perf_counter() - t0


def _write_new(path: Path, text: str) -> None:
    """A new file in place of ``path`` (never written through: a wheelhouse copied with
    ``cp -al`` shares its files with the original)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def relock(platform: str = "linux/amd64") -> Path:
    """Resolve the platform's lock again from pyproject.toml's pins; the lock's path.

    amd64: pip's own resolver (``pip install --dry-run --report``) on this x86_64 host, with the
    host's wheel store (where torch 2.14.1 lies). arm64: ``uv pip compile`` for
    ``aarch64-manylinux_2_28`` (pip evaluates environment markers for the host it runs on)."""
    if PLATFORMS[check_platform(platform)] == "arm64":
        _relock_arm64()
        return LOCK_ARM64
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
             "--quiet", "--report", str(report), *_amd64_requirements()],
            "pip install --dry-run (the x86_64 lock)",
        )  # fmt: skip
        found = json.loads(report.read_text())["install"]
    pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in found]
    pins.sort(key=str.lower)
    LOCK_AMD64.write_text("\n".join([*LOCK_AMD64_HEAD, *pins]) + "\n")
    return LOCK_AMD64


def _relock_arm64() -> None:
    """The client's requirements for aarch64 resolved with ``uv pip compile``."""
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    wanted = [*requirements("core", "arm64"), *requirements("headless"), "setuptools==80.9.0"]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.txt", Path(tmp) / "out.txt"
        src.write_text("\n".join(wanted) + "\n")
        _run(
            [uv, "pip", "compile", "--quiet", "--python-platform", "aarch64-manylinux_2_28",
             "--python-version", "3.11", "--native-tls", "--no-header", "--no-annotate",
             "--index-url", "https://pypi.org/simple", str(src), "-o", str(out)],
            "uv pip compile (the aarch64 lock)",
        )  # fmt: skip
        pins = [line for line in out.read_text().splitlines() if line and line[0].isalnum()]
    head = LOCK_ARM64.read_text().splitlines()[:2]
    LOCK_ARM64.write_text("\n".join([*head, *pins]) + "\n")


def build(
    role: str,
    *,
    tag: str | None = None,
    base: str | None = None,
    torch_index: str = "",
    cli: str | None = None,
    platform: str = "linux/amd64",
) -> Built:
    """``docker build -f Dockerfile.<role>`` with BuildKit; the image's tag, seconds and size.

    The image a rebuild untags (its source changed) is removed, not left dangling."""
    if role not in PLATFORM_ROLES[check_platform(platform)]:
        raise ImageError(
            f"no {role} image for {platform} (it builds: {', '.join(PLATFORM_ROLES[platform])})"
        )
    cli = cli or docker_cli()
    tag = tag or default_tag(role, platform)
    for name in write_dockerfiles():
        LOGGER.info("rewrote %s from deploy/docker/", name)
    WHEELHOUSE.mkdir(exist_ok=True)  # the Dockerfiles bind-mount it; empty = use the index
    previous = image_id(tag, cli)
    args = [
        cli,
        "build",
        "--file",
        str(PROJECT_ROOT / f"Dockerfile.{role}"),
        "--tag",
        tag,
        "--platform",
        platform,
        "--build-arg",
        f"VERSION={version('fedyolo')}",
        "--build-arg",
        f"REVISION={source_revision()}",
        "--label",
        f"{SOURCE_LABEL}={source_digest()}",
    ]
    if base:
        args += ["--build-arg", f"BASE_IMAGE={base}"]
    if torch_index:
        args += ["--build-arg", f"TORCH_INDEX_URL={torch_index}"]
    t0 = time.perf_counter()
    _run([*args, str(PROJECT_ROOT)], f"docker build {tag}", env={"DOCKER_BUILDKIT": "1"})
    seconds = time.perf_counter() - t0
    if previous and previous != image_id(tag, cli) and remove_if_dangling(previous, cli):
        LOGGER.info("removed %s's previous image %s", tag, previous[7:19])
    return Built(role, tag, seconds, image_size(tag, cli))


def build_images(
    *,
    offline: bool = False,
    base: str | None = None,
    torch_index: str = "",
    roles: tuple[str, ...] | None = None,
    tags: dict[str, str] | None = None,
    platform: str = "linux/amd64",
) -> list[Built]:
    """The platform's images (server first: the client then reuses the shared layers)."""
    roles = PLATFORM_ROLES[check_platform(platform)] if roles is None else roles
    cli = docker_cli()
    if offline:
        base = base or local_base(platform)
        if not image_exists(base, cli):
            LOGGER.info("offline: making the local base %s with debootstrap", base)
            LOGGER.info("local base in %.0f s", make_local_base(base, cli, platform))
        LOGGER.info("offline: the wheelhouse in %s", WHEELHOUSE)
        LOGGER.info("wheelhouse ready in %.0f s", make_wheelhouse(platform=platform))
    out = []
    for role in roles:
        LOGGER.info("building %s", (tags or {}).get(role) or default_tag(role, platform))
        out.append(
            build(
                role,
                tag=(tags or {}).get(role),
                base=base,
                torch_index=torch_index,
                cli=cli,
                platform=platform,
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
