"""Print the pinned requirements of one fedyolo role, read from ``pyproject.toml``.

    python3 requirements.py pyproject.toml core      # what every image needs (torch, Flower...)
    python3 requirements.py pyproject.toml server    # the server extra, without the core

The images install the core and the role's extra as separate layers, so the client and the
server image share the (large) core layer. Standard library only: it runs in the image's build
stage before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib

SELF = re.compile(r"^fedyolo\[([a-z,]+)\]$")


def requirements(pyproject: dict, role: str) -> list[str]:
    project = pyproject["project"]
    if role == "core":
        return list(project["dependencies"])
    extras = project["optional-dependencies"]
    if role not in extras:
        raise SystemExit(f"no extra {role!r} in pyproject.toml (extras: {sorted(extras)})")
    out: list[str] = []
    for req in extras[role]:
        nested = SELF.match(req.replace(" ", ""))
        reqs = (
            [r for e in nested.group(1).split(",") for r in requirements(pyproject, e)]
            if nested
            else [req]
        )
        out.extend(r for r in reqs if r not in out)
    return out


if __name__ == "__main__":
    path, role = sys.argv[1], sys.argv[2]
    with open(path, "rb") as f:
        print("\n".join(requirements(tomllib.load(f), role)))
