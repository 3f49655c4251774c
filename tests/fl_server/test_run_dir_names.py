"""``RunDir`` is the one home of the run files' names (issue 29, item 5).

A name written twice drifts: a renamed file is then found by one module and missed by another.
The source of every layered package (``deploy/aws`` excepted: another issue replaces it) is
read with ``ast``: a run file's name (``RunDir``'s constants, the files inside its folders
too: ``.work/candidate.pt``, ``data/server_val``) may appear only in ``fl_server/run_dir.py``.
Names with a suffix (``summary.json``) are refused as any string; bare folder names (``data``,
``logs``) only where they join a path (``x / "logs"``), since a dict key or a ``docker compose
logs`` argument is not a run file; a name's prefix (``client_``) where an f-string starting
with it joins a path (``data / f"client_{i}"``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fl_server.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fl_server", "fl_client", "strategies", "tuning", "deploy")
EXCEPT = ("deploy/aws/",)
# Files of the same name that are not a run's, each with why.
OTHERS = {
    # the data folder's own manifest, written by `fedyolo data partition` wherever it is asked
    ("fl_server/data/partition.py", "manifest.json"),
    # the tuning study's summary, in the study folder beside its runs (and the line naming it)
    ("tuning/outputs.py", "summary.md"),
    ("tuning/cli.py", "summary.md"),
    # ClearML's own file in its offline session folder
    ("fl_server/tracking.py", "metrics.jsonl"),
    # the export's scratch folder in its output bundle, not the run's
    ("deploy/edge/export.py", ".work"),
    # a data folder's layout, which `fedyolo data partition` writes wherever it is asked and a
    # SuperNode reads from its data root (fl_client cannot import fl_server's RunDir)
    ("fl_server/data/partition.py", "server_val"),
    ("fl_server/data/partition.py", "client_"),
    ("fl_client/handlers.py", "client_"),
    # `fedyolo data check`'s cleaned copies, in the folder the user names
    ("fl_server/commands.py", "repaired_labels"),
}


def run_file_names() -> set[str]:
    return {v for k, v in vars(RunDir).items() if k.isupper() and isinstance(v, str) and v.strip()}


def written_names(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """``(line, name)`` of each run file's name written in ``tree``."""
    files = {n for n in names if Path(n).suffix}
    joined: set[int] = set()  # ids of the constants that are a path's `/` operand
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for x in (node.left, node.right):
                if isinstance(x, ast.JoinedStr) and x.values:  # f"client_{i}": its first part
                    x = x.values[0]
                if isinstance(x, ast.Constant):
                    joined.add(id(x))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (node.value in files or (node.value in names and id(node) in joined))
    ]


def offenders(root: Path = ROOT) -> list[str]:
    names = run_file_names()
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == "fl_server/run_dir.py" or rel.startswith(EXCEPT):
                continue
            for line, name in written_names(ast.parse(path.read_text()), names):
                if (rel, name) not in OTHERS:
                    found.append(f"{rel}:{line}: {name!r}")
    return found


def test_run_file_names_are_written_only_in_run_dir():
    assert offenders() == [], "use RunDir's members (fl_server/run_dir.py) instead"


@pytest.mark.parametrize(
    ("source", "hit"),
    [
        ('p = run_dir / "summary.json"', True),
        ('name = "best.pt"', True),
        ('p = run_dir / "logs" / "x.log"', True),
        ('p = run.work / "candidate.pt"', True),
        ('p = run.data / "server_val" / "data.yaml"', True),
        ('p = run.data / f"client_{i}"', True),
        ('p = run.control / "caller.json"', True),
        ('name = f"client_{i}"', False),  # not a path
        ('p = folder / "data.yaml"', False),  # any dataset's file
        ('cmd = ("logs", "--no-color")', False),  # docker compose's subcommand, not a path
        ('d = {"data": 1}', False),
        ("p = RunDir(run_dir).summary", False),
    ],
)
def test_the_scan_finds_a_run_files_name_and_only_that(source, hit):
    assert bool(written_names(ast.parse(source), run_file_names())) is hit


def test_a_run_dir_reads_an_existing_directory_and_creates_nothing(tmp_path):
    run = RunDir(tmp_path / "runs" / "absent")
    assert run.read_events() == [] and run.read_summary() is None and run.rounds() == []
    assert not (tmp_path / "runs").exists()
