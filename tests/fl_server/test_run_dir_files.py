"""A run's JSON-lines files after a kill in the middle of an append, and its lock file
(``fl_server.run_dir``)."""

from __future__ import annotations

import errno
import json

import pytest

from fl_server.run_dir import CorruptRecord, append_jsonl, mend_torn_tail, read_jsonl

LINES = [{"round": 1, "map50_95": 0.1}, {"round": 2, "map50_95": 0.2}]


def written(path, records):
    for r in records:
        append_jsonl(path, r)
    return path


def test_a_torn_last_line_is_left_out_and_mended_away(tmp_path):
    path = written(tmp_path / "metrics.jsonl", LINES)
    whole = path.read_bytes()
    line = json.dumps({"round": 3, "map50_95": 0.3, "clients": [{"id": 0}] * 400})
    path.write_bytes(whole + line[: len(line) // 2].encode())  # the kill came mid-write
    assert read_jsonl(path) == LINES  # a reader (a dashboard, a resume) skips it
    assert mend_torn_tail(path) == len(line) // 2
    assert path.read_bytes() == whole
    append_jsonl(path, {"round": 3})  # the next line starts a line of its own
    assert read_jsonl(path) == [*LINES, {"round": 3}]
    assert mend_torn_tail(path) == 0 and mend_torn_tail(tmp_path / "absent.jsonl") == 0


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    path = written(tmp_path / "events.jsonl", LINES[:1])
    path.write_bytes(path.read_bytes() + json.dumps(LINES[1]).encode())
    assert read_jsonl(path) == LINES
    assert mend_torn_tail(path) == 0
    assert path.read_text().endswith("\n") and read_jsonl(path) == LINES


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    path = written(tmp_path / "metrics.jsonl", LINES)
    path.write_text(path.read_text().replace('{"round": 2', '{"round": 2 x', 1) + "{}\n")
    with pytest.raises(CorruptRecord, match=r"metrics.jsonl: line 2 is not JSON"):
        read_jsonl(path)


def test_a_lock_file_planted_as_a_link_is_never_followed(tmp_path):
    from fl_server.run_dir import RunDir

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / RunDir.LOCK).symlink_to(victim)  # taking the lock truncates and writes its pid
    with pytest.raises(OSError) as refused, run.held():
        pass
    assert refused.value.errno == errno.ELOOP  # O_NOFOLLOW: the link is not opened
    assert victim.read_text() == "keep me\n"


def test_where_the_file_system_has_no_locks_the_run_goes_on_and_says_so(
    tmp_path, monkeypatch, caplog
):
    import fcntl

    from fl_server.run_dir import RunDir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = RunDir(tmp_path)
    entered = False
    with run.held():
        entered = True
    assert entered and "cannot lock" in caplog.text and ".lock" in caplog.text
