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


def no_reporting_in_forked_children() -> None:
    """Keep ClearML out of this process's forked children.

    ``Task.init`` registers an ``os.register_at_fork`` child hook which, with a reporting
    thread, starts ClearML's background threads and thread pools inside every forked child,
    before the child execs. Ray starts its processes with fork and a ``preexec_fn``: a child forked
    while another thread of the server held a module's import lock deadlocked in that hook
    (seen in CI: a resumed simulation hung in ``ray.init``, its forked child waiting on
    ``multiprocessing.dummy``'s module lock, found with gdb). fedyolo reports from the server
    process only, never from a forked child. The hook returns at once when PRIVATE
    ``clearml.binding.environ_bind.PatchOsFork._current_task`` is None, which ClearML's own
    ``PatchOsFork.patch_fork(None)`` sets.
    """
    PatchOsFork = _patch_os_fork()  # noqa: N806 - ClearML's class
    PatchOsFork.patch_fork(None)


def no_fork_hooks_from_task_init() -> None:
    """Before ``Task.init``: keep it from registering its at-fork hooks at all.

    ``Task.init`` registers them part-way through (``PatchOsFork.patch_fork(task)``) and goes on
    initialising for a while; :func:`no_reporting_in_forked_children` can only switch them off
    after it returns. In the simulation engine Flower starts Ray in the main thread while the
    ServerApp's thread runs ``Task.init``, so Ray could fork inside that window: a benchmark run
    hung in round 1 that way (2026-12-04: the raylet never started, its forked child waiting in
    ClearML's hook on an import lock). PRIVATE ``PatchOsFork._registered_fork_callbacks``: when
    it is set, ``patch_fork`` registers nothing (ClearML's own "only once" guard).
    """
    PatchOsFork = _patch_os_fork()  # noqa: N806 - ClearML's class
    if not hasattr(PatchOsFork, "_registered_fork_callbacks"):
        raise AttributeError(
            "clearml.binding.environ_bind.PatchOsFork changed (ClearML upgraded?): "
            "fl_server/clearml_adapter.py needs another way to keep Task.init's fork hooks out"
        )
    PatchOsFork._registered_fork_callbacks = True


def _patch_os_fork():
    from clearml.binding.environ_bind import PatchOsFork

    if not hasattr(PatchOsFork, "_current_task") or not hasattr(PatchOsFork, "patch_fork"):
        raise AttributeError(
            "clearml.binding.environ_bind.PatchOsFork changed (ClearML upgraded?): "
            "fl_server/clearml_adapter.py needs another way to keep ClearML out of forked children"
        )
    return PatchOsFork


def api_server_host() -> str:
    """The ClearML API server this process would talk to (from ``CLEARML_API_HOST`` or
    ``clearml.conf``, as ClearML resolves it), for the reachability probe before ``Task.init``.

    PRIVATE: ``clearml.backend_api.session.Session.get_api_server_host()`` (ClearML's public
    ``Task`` API has no way to name the server before it connects).
    """
    from clearml.backend_api.session import Session

    return str(Session.get_api_server_host())
