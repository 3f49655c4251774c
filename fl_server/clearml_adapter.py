"""ClearML internals fedyolo relies on, in one place (tests/fl_server/test_library_adapters.py)."""

from __future__ import annotations

from typing import Any


def use_reporting_thread(task_class: Any) -> None:
    """Report through a thread instead of ClearML's subprocess.

    ClearML's default on Linux reports through a subprocess whose shutdown costs 5-10 s at every
    flush and close (measured here); a reporting thread, its default elsewhere, costs
    milliseconds, and the server reports only once per round. There is no public switch:
    PRIVATE ``Task._report_subprocess_enabled`` (a class attribute read by ``Task.init``).
    """
    if not hasattr(task_class, "_report_subprocess_enabled"):
        raise AttributeError(
            "clearml.Task._report_subprocess_enabled is gone (ClearML upgraded?): "
            "fl_server/clearml_adapter.py needs another way to pick the reporting thread"
        )
    task_class._report_subprocess_enabled = False
