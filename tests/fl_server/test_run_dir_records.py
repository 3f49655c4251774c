"""``RunDir`` writes and reads the typed round record (``fl_server.records.RoundRecord``)."""

from __future__ import annotations

import typing

from fl_server.records import RoundRecord
from fl_server.run_dir import RunDir


def test_the_round_files_methods_are_typed_with_the_round_record():
    assert typing.get_type_hints(RunDir.add_round)["record"] is RoundRecord
    assert typing.get_type_hints(RunDir.rounds)["return"] == list[RoundRecord]
    assert typing.get_type_hints(RunDir.rewrite_rounds)["rounds"] == list[RoundRecord]
