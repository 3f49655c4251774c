"""Event kinds, statuses and round records are types (``fl_server.records``): the run directory
refuses a bare string, every member is written by some code, the files on disk read as before,
and a real round's ``metrics.jsonl`` line has exactly ``RoundRecord``'s keys."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from fl_server.records import ClientEntry, EventKind, RoundRecord, Status, round_record
from fl_server.run_dir import METRIC_KEYS, RunDir, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fl_server", "fl_client", "strategies", "tuning", "deploy")
# RunDir.event and the wrappers that pass a kind on to it
EVENT_WRITERS = {"event", "_event", "_warn", "_fail"}
SNAKE = re.compile(r"^[a-z]+(?:_[a-z]+)*$")  # a kind's shape


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_a_bare_string_kind_is_refused(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(TypeError, match="'rollback' is not an EventKind"):
        run.event(1, "rollback", reason="x")
    assert not run.events.exists()  # nothing written


def test_events_and_summary_on_disk_hold_plain_strings(tmp_path):
    run = RunDir(tmp_path)
    heard = []
    run.subscribe(lambda rnd, kind, details: heard.append((rnd, kind, details)))
    run.event(2, EventKind.HOOK_STOP, status=Status.PRUNED)
    assert run.events.read_text() == '{"round": 2, "kind": "hook_stop", "status": "pruned"}\n'
    assert read_jsonl(run.events)[0]["kind"] == EventKind.HOOK_STOP
    assert heard == [(2, "hook_stop", {"status": "pruned"})]
    run.write_summary([], status=Status.STOPPED)
    assert json.loads(run.summary.read_text())["status"] == "stopped"


def test_no_event_writer_is_called_with_a_string_literal():
    """A kind typed as a literal would raise at run time, perhaps only on a rare path (an S3
    failure): found here, statically."""
    literal = []
    for path, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in EVENT_WRITERS and any(
                isinstance(a, ast.Constant) and isinstance(a.value, str) and SNAKE.match(a.value)
                for a in node.args[1:3]
            ):
                literal.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert literal == [], f"event kinds written as strings, not EventKind members: {literal}"


@pytest.mark.parametrize("enum", [EventKind, Status], ids=lambda e: e.__name__)
def test_every_member_is_used_by_the_code(enum):
    """Each kind and status is written (or, for ``running``, checked) somewhere: the reference
    page lists no kind that nothing writes."""
    code = "\n".join(text for path, text in _sources().items() if path.name != "records.py")
    unused = [m.name for m in enum if not re.search(rf"\b{enum.__name__}\.{m.name}\b", code)]
    if enum is Status:  # a round hook asks for these by their strings (fl_server.hooks)
        unused = [n for n in unused if n not in {"STOPPED", "PRUNED"}]
    assert unused == []


def _keys(typed: type) -> tuple[set[str], set[str]]:
    """(required, every) key of a TypedDict."""
    return set(typed.__required_keys__), set(typed.__annotations__)


def test_a_real_rounds_record_has_exactly_the_typed_keys(tmp_path):
    """One in-process round with clients evaluating too: ``metrics.jsonl``'s line holds every
    key of ``RoundRecord`` (``client_eval`` included) and nothing else; each client entry holds
    the required ``ClientEntry`` keys and only typed ones, and the JSON is the record itself."""
    from inprocess import run_inprocess

    run, _ = run_inprocess(tmp_path, ["federation.fraction_evaluate=1.0"], clients=2)
    (line,) = run.metrics.read_text().splitlines()
    (record,) = run.rounds()
    assert set(record) == set(RoundRecord.__annotations__)
    assert list(record)[:2] == ["round", "map50"] and list(record)[-1] == "client_eval"
    required, every = _keys(ClientEntry)
    entries = record["clients"] + record["client_eval"]
    assert len(record["clients"]) == 2 and len(record["client_eval"]) == 2
    for entry in entries:
        assert required <= set(entry) <= every, set(entry) ^ every
    assert "batches" in record["clients"][0] and "map50" in record["client_eval"][0]
    assert json.loads(line) == record
    # the cost fields: the aggregation is a part of the round, the server and every client
    # that did the work (train and evaluate) report a resident memory
    assert 0 <= record["aggregate_seconds"] < record["round_seconds"]
    assert record["aggregate_seconds"] + record["eval_seconds"] <= record["round_seconds"]
    assert record["server_rss_mb"] > 0
    assert all(e["rss_mb"] > 0 for e in entries)


def test_the_round_records_metrics_are_what_the_summary_reads():
    assert set(METRIC_KEYS) <= set(RoundRecord.__required_keys__)


def test_round_record_omits_client_eval_when_no_client_evaluated():
    record = round_record(
        4,
        {"map50": 0.5, "map50_95": 0.3, "precision": 0.6, "recall": 0.4, "per_class": {},
         "weights_sha256": "ab"},
        clients=[], client_eval=[], failures=1, transport_seconds=0.1,
        contribution_seconds=0.0, aggregate_seconds=0.01, server_rss_mb=900.0,
        guard={"decision": "accept"}, global_sha256="ab",
        round_seconds=2.0, eval_seconds=0.5, lr0=0.01,
    )  # fmt: skip
    required, every = _keys(RoundRecord)
    assert set(record) == required == every - {"client_eval"}
