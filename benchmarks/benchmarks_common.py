"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import platform


def machine() -> str:
    import psutil

    return (
        f"{platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, CPU only, "
        f"Python {platform.python_version()}"
    )
