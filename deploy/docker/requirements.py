"""Print the pinned requirements of one fedyolo role, read from ``pyproject.toml``.

    python3 requirements.py pyproject.toml core [ARCH]   # what every image needs (torch, Flower...)
    python3 requirements.py pyproject.toml server        # the server extra, without the core
    python3 requirements.py pyproject.toml drop          # installed by dependencies, then removed
    python3 requirements.py pyproject.toml headless      # what replaces the desktop OpenCV
    python3 requirements.py pyproject.toml cuda [ARCH]   # torch's NVIDIA libraries, from the lock

The images install the core and the role's extra as separate layers, so the client and the
server image share the (large) core layers. The core is two layers: torch's NVIDIA libraries
(``cuda``: the lock's ``nvidia-*`` and ``cuda-*`` packages, 3.2 GB of the 5.5 GB on x86_64),
then the rest. Docker compresses a layer on one core when it pushes and decompresses it on one
core when it pulls; two layers of that size take two cores. Standard library only: it runs in
the image's build stage before anything is installed.

ARCH is Docker's TARGETARCH (``amd64``, ``arm64``). On arm64 torch and torchvision are pinned
to the newest release whose PyPI aarch64 wheel is a CPU build (``ARCH_PINS``): from torch 2.11
on, PyPI's aarch64 wheels are CUDA 13 builds whose ``libtorch_cpu.so`` itself links
``libcudart``/``libcupti``, i.e. gigabytes of NVIDIA libraries on a Raspberry Pi.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SELF = re.compile(r"^fedyolo\[([a-z,]+)\]$")
ARCH_PINS = {"arm64": {"torch": "torch==2.10.0", "torchvision": "torchvision==0.25.0"}}
# Dependencies the images remove after pip installed them (same RUN, so never in a layer):
# triton only serves torch.compile's GPU kernels (fedyolo never compiles); opencv-python is
# Ultralytics' requirement, replaced by the same release of the headless build (no X11/GL).
DROP = ("triton", "opencv-python")
HEADLESS = {"opencv-python": "opencv-python-headless"}
CUDA = re.compile(r"^(nvidia|cuda)-[a-z0-9-]+==\S+$")  # a pinned line of the lock


def _name(req: str) -> str:
    return re.split(r"[=<>!~\[; ]", req, maxsplit=1)[0].lower()


def cuda(lock: Path) -> list[str]:
    """The lock's pinned NVIDIA packages (torch's CUDA libraries; on arm64, where torch is a CPU
    build, only Ultralytics' NVML bindings); none without a lock."""
    if not lock.is_file():
        return []
    return [ln.strip() for ln in lock.read_text().splitlines() if CUDA.match(ln.strip())]


def requirements(pyproject: dict, role: str, arch: str = "amd64") -> list[str]:
    project = pyproject["project"]
    if role == "cuda":
        return cuda(Path(__file__).with_name(f"lock-{arch or 'amd64'}.txt"))
    if role == "core":
        pins = ARCH_PINS.get(arch, {})
        return [pins.get(_name(r), r) for r in project["dependencies"]]
    if role == "headless":
        return [
            HEADLESS[_name(r)] + r[len(_name(r)) :]
            for r in project["dependencies"]
            if _name(r) in HEADLESS
        ]
    if role == "drop":
        return list(DROP)
    extras = project["optional-dependencies"]
    if role not in extras:
        raise SystemExit(f"no extra {role!r} in pyproject.toml (extras: {sorted(extras)})")
    out: list[str] = []
    for req in extras[role]:
        nested = SELF.match(req.replace(" ", ""))
        reqs = (
            [r for e in nested.group(1).split(",") for r in requirements(pyproject, e, arch)]
            if nested
            else [req]
        )
        out.extend(r for r in reqs if r not in out)
    return out


if __name__ == "__main__":
    path, role = sys.argv[1], sys.argv[2]
    with open(path, "rb") as f:
        print("\n".join(requirements(tomllib.load(f), role, *sys.argv[3:4])))
