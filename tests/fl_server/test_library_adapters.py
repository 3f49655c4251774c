"""The Flower and ClearML internals fedyolo relies on (fl_server/*_adapter.py) still hold."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict


def test_wire_bytes_sums_to_flowers_own_serialized_size():
    from flwr.common.serde import message_to_proto

    from fl_server.flower_adapter import varint_size, wire_bytes

    for n in (0, 1, 127, 128, 16383, 16384, 2**21, 2**35):
        from google.protobuf.internal import encoder

        assert varint_size(n) == len(encoder._VarintBytes(n)), n  # protobuf's own, for the test
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(5000, dtype=np.float32))}),
            "config": ConfigRecord({"server-round": 3}),
        }
    )
    msg = Message(content=content, dst_node_id=7, message_type="train")
    sizes: dict[int, int] = {}
    assert wire_bytes(msg, sizes) == message_to_proto(msg).ByteSize(), (
        "flwr.common.serde's Message layout changed: fl_server/flower_adapter.py's wire_bytes "
        "no longer adds up to the serialized message"
    )


def test_clearml_reporting_thread_switch_exists():
    from clearml import Task

    from fl_server.clearml_adapter import use_reporting_thread

    saved = Task._report_subprocess_enabled
    try:
        use_reporting_thread(Task)
        assert Task._report_subprocess_enabled is False
    finally:
        Task._report_subprocess_enabled = saved


def test_clearml_starts_nothing_in_a_forked_child(tmp_path, monkeypatch):
    """ClearML's at-fork hook started its reporting threads in every forked child before exec;
    Ray forks with a preexec_fn, and one such child deadlocked on an import lock. After
    ``open_task`` a forked child has only the thread that forked it."""
    import subprocess
    import sys
    import threading

    from fl_server.run_dir import RunDir
    from fl_server.tracking import open_task

    run = RunDir(tmp_path / "run")
    run.clearml.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(run.clearml))
    task = open_task(run, "offline", "fedyolo-tests", "fork")
    out = tmp_path / "threads"
    try:

        def count_threads() -> None:  # runs in the forked child, before exec (as Ray's does)
            out.write_text(str(threading.active_count()))

        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=count_threads, check=True)
    finally:
        task.close()
    assert out.read_text() == "1"
