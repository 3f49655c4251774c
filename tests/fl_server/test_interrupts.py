"""Ctrl-C/SIGTERM as a clean stop (fl_server.interrupts), shared by both engines."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from fl_server.interrupts import StopFile, interrupts_to


@pytest.mark.parametrize("make", [lambda p: threading.Event(), lambda p: StopFile(p / "stop")])
def test_first_signal_sets_the_flag_and_the_second_leaves(tmp_path, make):
    flag = make(tmp_path)
    with interrupts_to(flag):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next bytecode
        assert flag.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back


def test_before_it_is_armed_a_signal_leaves_at_once(tmp_path):
    flag, armed = StopFile(tmp_path / "stop"), threading.Event()
    with interrupts_to(flag, armed=armed.is_set), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
    assert not flag.is_set()


def test_a_stop_file_is_seen_by_another_reader(tmp_path):
    writer, reader = StopFile(tmp_path / "stop"), StopFile(tmp_path / "stop")
    assert not reader.wait(0.01)
    writer.set()
    assert reader.is_set() and reader.wait(0.01)
    writer.clear()
    assert not reader.is_set()
