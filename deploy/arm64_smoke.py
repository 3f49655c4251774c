"""The linux/arm64 client's fast check, without Docker and without an emulated installation.

``python -m deploy.arm64_smoke`` (``tests/e2e/test_arm64_smoke.py``, required in CI) proves
on an x86_64 host that the arm64 client's packages import and train on aarch64, in a few
minutes instead of the ~25 of the image build (``tests/e2e/test_arm64_client.py``, opt-in):

1. an aarch64 Debian 12 root with Python 3.11 (``ROOT_PACKAGES``) from the image base's suite
   and mirror: ``debootstrap --foreign`` (its first stage: download and unpack, nothing run),
   then the included packages unpacked on the host with ``dpkg-deb`` (never configured: no
   maintainer script runs, no ``ldconfig``);
2. the client's packages as the image gets them: the aarch64 wheelhouse
   (``deploy.images.make_wheelhouse(platform="linux/arm64")``, pinned by
   ``deploy/docker/lock-arm64.txt``), less what the image removes after installing
   (``requirements("drop")``: the desktop OpenCV), unpacked with ``pip install --target
   --platform`` on the host at native speed (the byte code compiled there: CPython 3.11 on
   both sides);
3. ``qemu-aarch64-static -L <root> <root>/usr/bin/python3.11 -m deploy.arm64_smoke --probe``
   with ``PYTHONPATH=<site>:<repo>``: the interpreter and every native library run as aarch64
   code under user-mode emulation (no binfmt_misc, no chroot). :func:`probe` checks the machine,
   a CPU build of torch, the client's imports (and no server code among them), then builds
   ``configs/model/tiny.yaml``'s model and trains it one step at 64 px with Ultralytics'
   detection loss. It prints one JSON line (timings, loss, tensors changed).

Steps 1 and 2 run side by side and are cached under ``~/.cache/fedyolo/arm64-smoke/`` (not in the
checkout), keyed by what they are made from (the root: suite, mirror, packages; the site: the lock's
sha256 and the dropped packages); a key that changes replaces its folder.

What it does not prove: that the image builds (its Dockerfile steps, pip's resolution inside
it, the venv, the non-root user) and that a container joins a federation; Debian's packages
are unpacked, not configured as ``apt`` would; the base is Python 3.11 from ``python3.11-minimal``
and ``libpython3.11-stdlib``, not the image's ``python3``/``python3-venv`` set. Needs root
(``debootstrap``), ``debootstrap``, ``dpkg-deb`` and ``qemu-user-static``; the mirror and the
wheels' index must be reachable on a first run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deploy.images import (
    AARCH64_TAGS,
    DEBIAN_MIRROR,
    DEBIAN_SUITE,
    LOCK_ARM64,
    PROJECT_ROOT,
    WHEELHOUSE,
    ImageError,
    _run,
    make_wheelhouse,
    requirements,
)


def cache_dir() -> Path:
    """Where the root and packages are cached: outside the checkout, because ClearML's Task.init
    scans the project's Python files for its requirements, and 1.4 GB of unpacked aarch64
    packages in it made every tracked run's end wait minutes (seen in CI, 2026-12-04).
    ``FEDYOLO_ARM64_SMOKE_CACHE`` sets another place."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("FEDYOLO_ARM64_SMOKE_CACHE") or base / "fedyolo" / "arm64-smoke")


# Python 3.11 and its standard library (debootstrap adds their dependencies)
ROOT_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib")
QEMU = "qemu-aarch64-static"
READY = ".ready"  # written last: a folder without it is an interrupted build
TOOLS = {
    "debootstrap": "apt-get install debootstrap",
    "dpkg-deb": "apt-get install dpkg",
    QEMU: "apt-get install qemu-user-static",
}
MODEL_CONFIG = PROJECT_ROOT / "configs" / "model" / "tiny.yaml"
# modules the client image does not hold (server, tuning, AWS code; the server's packages)
NOT_IN_CLIENT = ("fl_server", "tuning", "strategies", "deploy.aws", "ray", "optuna", "boto3")


def missing() -> str | None:
    """Why the smoke cannot run on this machine (a missing tool or no root), else None."""
    absent = [tool for tool in TOOLS if not shutil.which(tool)]
    if absent:
        return f"{', '.join(absent)} not installed ({'; '.join(TOOLS[t] for t in absent)})"
    if os.geteuid() != 0:
        return "debootstrap needs root"
    return None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _name(requirement: str) -> str:
    return requirement.split("==", 1)[0].strip().lower().replace("_", "-")


def site_requirements() -> list[str]:
    """The aarch64 lock's pins less the packages the image removes after installing them."""
    drop = {_name(r) for r in requirements("drop")}
    pins = [ln.strip() for ln in LOCK_ARM64.read_text().splitlines()]
    return [p for p in pins if p and not p.startswith("#") and _name(p) not in drop]


def _fresh(cache: Path, kind: str, key: str) -> tuple[Path, Path]:
    """The cached folder of ``kind`` for ``key`` and an empty work folder beside it."""
    dest = cache / f"{kind}-{key}"
    work = cache / f"{kind}-{key}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return dest, work


def _publish(work: Path, dest: Path, cache: Path, kind: str) -> None:
    """``work`` becomes ``dest``; folders of the same kind under other keys go."""
    (work / READY).write_text(dest.name + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    for other in cache.glob(f"{kind}-*"):
        if other != dest:
            shutil.rmtree(other, ignore_errors=True)


def make_root(cache: Path | None = None) -> tuple[Path, float]:
    """An aarch64 Debian root holding Python 3.11, made without running any of its code; its
    folder and the seconds taken (0 when cached)."""
    cache = cache or cache_dir()
    key = _digest(DEBIAN_SUITE, DEBIAN_MIRROR, "arm64", *ROOT_PACKAGES)
    dest = cache / f"root-{key}"
    if (dest / READY).exists():
        return dest, 0.0
    t0 = time.perf_counter()
    dest, work = _fresh(cache, "root", key)
    _run(
        ["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
         f"--include={','.join(ROOT_PACKAGES)}", DEBIAN_SUITE, str(work), DEBIAN_MIRROR],
        "debootstrap --foreign --arch=arm64 (the smoke's root)",
    )  # fmt: skip
    # The first stage unpacked the required packages only; the rest ("base": the included
    # ones and their dependencies) is downloaded for the second stage, which would run
    # under emulation. Unpacked here instead, through the merged /usr's links.
    paths = dict(
        line.split(maxsplit=1)
        for line in (work / "debootstrap" / "debpaths").read_text().splitlines()
    )
    for package in (work / "debootstrap" / "base").read_text().split():
        _unpack(work / paths[package].strip().lstrip("/"), work)
    for deb in (work / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()
    shutil.rmtree(work / "dev")  # device nodes: qemu falls back to the host's /dev
    (work / "dev").mkdir()
    _publish(work, dest, cache, "root")
    return dest, time.perf_counter() - t0


def _unpack(deb: Path, root: Path) -> None:
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as src:
        tar = subprocess.run(
            ["tar", "-C", str(root), "--keep-directory-symlink", "-xf", "-"],
            stdin=src.stdout, capture_output=True, text=True, check=False,
        )  # fmt: skip
    if src.returncode or tar.returncode:
        raise ImageError(f"unpacking {deb.name} into the arm64 root failed: {tar.stderr[-500:]}")


def make_site(cache: Path | None = None, wheelhouse: Path = WHEELHOUSE) -> tuple[Path, float]:
    """The arm64 client's packages unpacked for aarch64 (a ``--target`` folder for
    ``PYTHONPATH``); its folder and the seconds taken (0 when cached)."""
    cache = cache or cache_dir()
    reqs = site_requirements()
    key = _digest(hashlib.sha256(LOCK_ARM64.read_bytes()).hexdigest(), *reqs)
    dest = cache / f"site-{key}"
    if (dest / READY).exists():
        return dest, 0.0
    t0 = time.perf_counter()
    make_wheelhouse(wheelhouse, "linux/arm64")
    dest, work = _fresh(cache, "site", key)
    tmp = cache / "tmp"  # pip unpacks here and moves into --target: the same file system
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "requirements.txt").write_text("\n".join(reqs) + "\n")
    tags = [a for t in AARCH64_TAGS for a in ("--platform", t)]
    _run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--find-links", str(wheelhouse / "arm64"), "--target", str(work), *tags,
         "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
         "--requirement", str(tmp / "requirements.txt")],
        "pip install --target (the smoke's aarch64 packages)",
        # the wheelhouse only, as in the image: no configuration file's find-links (this
        # machine's x86_64 store) and no host constraint (it caps torch for the host)
        env={"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(wheelhouse / "arm64"),
             "PIP_CONSTRAINT": "", "TMPDIR": str(tmp)},
    )  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)
    _publish(work, dest, cache, "site")
    return dest, time.perf_counter() - t0


def run_probe(root: Path, site: Path, timeout: float = 900) -> dict:
    """:func:`probe` in ``root``'s Python under qemu with ``site`` and this repository on its
    path; its JSON line. ``ImageError`` with the output's tail when it fails."""
    qemu = shutil.which(QEMU)
    if not qemu:
        raise ImageError(f"{QEMU} is not installed ({TOOLS[QEMU]})")
    with tempfile.TemporaryDirectory(prefix="fedyolo-arm64-smoke-") as tmp:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tmp,
            "PYTHONPATH": f"{site}{os.pathsep}{PROJECT_ROOT}",
            "PYTHONNOUSERSITE": "1",
            "PYTHONUNBUFFERED": "1",
            "YOLO_OFFLINE": "1",
            "YOLO_CONFIG_DIR": f"{tmp}/ultralytics",
            "MPLCONFIGDIR": f"{tmp}/matplotlib",
            "FLWR_HOME": f"{tmp}/flwr",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        cmd = [qemu, "-L", str(root), str(root / "usr/bin/python3.11"),
               "-m", "deploy.arm64_smoke", "--probe"]  # fmt: skip
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise ImageError(f"the arm64 probe ran past {timeout:.0f} s under qemu") from e
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise ImageError(
            f"the arm64 probe failed under qemu (exit {done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    return json.loads(lines[-1])


def smoke(cache: Path | None = None) -> dict:
    """The whole check: root and site (side by side, cached), then the probe under qemu; the
    probe's JSON with the seconds each part took (``root_s``/``site_s`` 0 when cached)."""
    cache = cache or cache_dir()
    problem = missing()
    if problem:
        raise ImageError(f"the arm64 smoke cannot run here: {problem}")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        root_job = pool.submit(make_root, cache)  # mostly the mirror's downloads
        site, site_s = make_site(cache)  # mostly unzipping and compiling on this CPU
        root, root_s = root_job.result()
    t1 = time.perf_counter()
    result = run_probe(root, site)
    t2 = time.perf_counter()
    return {
        **result,
        "root_s": round(root_s, 1),
        "site_s": round(site_s, 1),
        "prepare_s": round(t1 - t0, 1),
        "probe_s": round(t2 - t1, 1),
        "wall_s": round(t2 - t0, 1),
    }


# ---- inside the emulated interpreter ----


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"arm64 probe: {what}")


def probe() -> dict:
    """What the client needs, checked in the running interpreter (meant for aarch64): the
    machine, torch's CPU build, the client's imports, one training step of the tiny model."""
    t0 = time.perf_counter()
    _check(platform.machine() == "aarch64", f"runs on {platform.machine()}, not aarch64")
    import torch

    _check(torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build")
    import flwr
    import ultralytics

    # imported to prove they import, as the client image's build step does
    import deploy.health  # noqa: F401
    import deploy.supernode  # noqa: F401
    import fl_client.client_app  # noqa: F401

    imports_s = time.perf_counter() - t0
    server_side = [m for m in NOT_IN_CLIENT if m in sys.modules]
    _check(not server_side, f"the client's imports load {server_side} (not in the client image)")
    step = train_step()
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ultralytics": ultralytics.__version__,
        "flwr": flwr.__version__,
        **step,
        "imports_s": round(imports_s, 1),
    }


def train_step(imgsz: int = 64) -> dict:
    """One training step of ``configs/model/tiny.yaml``'s model as the client builds it
    (``fl_client.model.build_model``): forward, Ultralytics' detection loss on a synthetic
    batch of two images with a box each, backward, an SGD step. Fails unless the loss is
    finite and positive, every gradient finite and some weights moved.

    ``model.args`` (the loss's gains) and ``model.loss`` are what Ultralytics' trainer sets
    and calls (``DetectionModel.init_criterion``)."""
    import torch
    import yaml
    from ultralytics.cfg import get_cfg

    from fl_client.model import build_model

    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())["cfg"]
    model = build_model(cfg, ["car", "person"])
    model.args = get_cfg()
    model.train()
    build_s = time.perf_counter() - t0
    before = [p.detach().clone() for p in model.parameters()]
    batch = {
        "img": torch.rand(2, 3, imgsz, imgsz),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.4]]),  # xywh, 0-1
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    t1 = time.perf_counter()
    loss, _ = model.loss(batch)
    loss = loss.sum()
    optimizer.zero_grad()
    loss.backward()
    grads_finite = all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
    optimizer.step()
    step_s = time.perf_counter() - t1
    value = float(loss.detach())
    changed = sum(
        not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True)
    )
    _check(math.isfinite(value) and value > 0, f"the loss is {value}")
    _check(grads_finite, "a gradient is not finite")
    _check(changed > 0, "the optimizer step changed no weight")
    return {
        "imgsz": imgsz,
        "loss": value,
        "tensors": len(before),
        "changed_tensors": changed,
        "build_s": round(build_s, 1),
        "step_s": round(step_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.arm64_smoke", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--probe", action="store_true", help="check this interpreter (aarch64) only"
    )
    args = parser.parse_args(argv)
    try:
        result = probe() if args.probe else smoke()
    except ImageError as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
