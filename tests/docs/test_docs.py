"""The documentation builds and its reference tables cannot drift from the code.

``mkdocs build --strict`` runs here, so ``make test`` (what CI runs) fails on a broken link, a
page left out of the nav or a benchmark section that no longer renders. The event kinds, the
statuses and the run directory's files are read from the code (the ``RunDir`` paths, the kinds
passed to the run directory's event writers, the statuses written to ``summary.json``) and
compared with the reference pages, both ways; every repository path a page quotes must exist.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PACKAGES = ("fl_server", "fl_client", "strategies", "tuning", "deploy")
SNAKE = re.compile(r"^[a-z]+(?:_[a-z]+)*$")
# The calls that write events.jsonl: RunDir.event and the wrappers that pass a kind on to it.
EVENT_WRITERS = {"event", "_event", "_warn", "_fail"}


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def _callee(node: ast.Call) -> str | None:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def event_kinds_in_code() -> set[str]:
    """The literal kinds handed to an event writer: the first string argument, after the round."""
    kinds: set[str] = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or _callee(node) not in EVENT_WRITERS:
                continue
            for i, arg in enumerate(node.args):
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if i >= 1 and SNAKE.match(arg.value):
                        kinds.add(arg.value)
                    break
    return kinds


def _is_status(node: ast.AST) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
    return name == "status"


def _status_values(node: ast.AST) -> list[ast.AST]:
    """What ``node`` sets ``status`` to or compares it with, if anything."""
    if isinstance(node, ast.keyword):
        return [node.value] if node.arg == "status" else []
    if isinstance(node, ast.Compare):
        return list(node.comparators) if _is_status(node.left) else []
    if not isinstance(node, ast.Assign):
        return []
    if any(_is_status(t) for t in node.targets):
        return [node.value]
    if isinstance(node.targets[0], ast.Tuple):  # status, reason = "failed", None
        pairs = zip(node.targets[0].elts, getattr(node.value, "elts", []), strict=False)
        return [v for t, v in pairs if _is_status(t)]
    return []


def statuses_in_code() -> set[str]:
    """Status strings the code writes, returns or compares: ``status="..."`` arguments,
    assignments to and comparisons with ``status``, and the stop statuses hooks may ask for."""
    from fl_server.hooks import STOP_STATUSES

    found: set[str] = set(STOP_STATUSES)
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            found |= {
                v.value
                for v in _status_values(node)
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            }
    return {s for s in found if SNAKE.match(s)}


def _table_first_column(page: Path, heading: str) -> set[str]:
    """The backticked names in the first column of the first table under ``## heading``."""
    text = page.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        m = re.match(r"^\| `([^`]+)` \|", line)
        if m:
            names.add(m.group(1))
    return names


def test_mkdocs_build_strict(tmp_path):
    """The site builds with --strict (a broken link, an unknown nav page, a failing hook)."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    bench = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert "<!-- benchmark:" not in bench and "ONNX INT8 u8 (chosen)" in bench
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "guard.max_drop" in config and "federation.round_timeout" in config


def test_site_fetches_nothing():
    """No web fonts, no external stylesheets or scripts: the site works offline."""
    cfg = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^\s+font: false$", cfg, re.M)
    assert "extra_css" not in cfg and "extra_javascript" not in cfg


def test_every_event_kind_is_documented_and_vice_versa():
    documented = _table_first_column(DOCS / "reference" / "events.md", "Events")
    written = event_kinds_in_code()
    assert {"run_start", "rollback", "client_failed", "run_end"} <= written  # the scan works
    assert written - documented == set(), (
        "events the code writes but docs/reference/events.md lacks"
    )
    assert documented - written == set(), "events docs/reference/events.md lists but no code writes"


def test_every_status_is_documented_and_vice_versa():
    documented = _table_first_column(DOCS / "reference" / "events.md", "Statuses")
    written = statuses_in_code()
    assert {"completed", "failed", "interrupted", "running", "stopped", "pruned"} <= written
    assert written == documented


def test_every_run_file_is_documented():
    """Every file and folder ``RunDir`` names appears in the run directory page's tables, and
    every file those tables name is one RunDir knows or one the page says other code writes."""
    from fl_server.run_dir import RunDir

    run = RunDir(Path("/run"))
    named = {
        p.name + ("/" if p.suffix == "" and not p.name.startswith(".interrupt") else "")
        for p in vars(run).values()
        if isinstance(p, Path) and p.parent == run.path
    }
    text = (DOCS / "reference" / "run-directory.md").read_text()
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    cells = {c for row in rows for c in re.findall(r"`([^`]+)`", row)}
    listed = {n for c in cells for n in re.split(r",\s*", c)}
    missing = {n for n in named if n not in listed and n.rstrip("/") not in listed}
    assert missing == set(), f"RunDir files missing from docs/reference/run-directory.md: {missing}"


PATH_IN_TICKS = re.compile(
    r"`((?:fl_server|fl_client|strategies|tuning|deploy|configs|tests|"
    r"benchmarks|docs)(?:/[\w.\-]+)+/?)`"
)


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(DOCS)))
def test_quoted_repository_paths_exist(page):
    gone = [p for p in PATH_IN_TICKS.findall(page.read_text()) if not (ROOT / p).exists()]
    assert gone == [], f"{page.relative_to(ROOT)} quotes paths that do not exist: {gone}"


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link
