"""The documentation builds and its reference tables cannot drift from the code.

``mkdocs build --strict`` runs here, so ``make test`` (what CI runs) fails on a broken link, a
page left out of the nav or a benchmark section that no longer renders. The event kinds, the
statuses and the run directory's files are read from the code (the ``RunDir`` paths, and the
types ``EventKind`` and ``Status`` of ``fl_server.records``, which every writer uses:
``RunDir.event`` refuses anything else) and compared with the reference pages, both ways; every
repository path a page quotes must exist.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fl_server.hooks import STOP_STATUSES
from fl_server.records import ClientEntry, EventKind, RoundRecord, Status

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


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


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with --strict (a broken link, an unknown nav page, a failing hook
    or an API page mkdocstrings cannot render fail it)."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _text(page: Path) -> str:
    """A built page's text: tags out, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.read_text())).split())


def test_mkdocs_build_strict(site):
    bench = (site / "benchmarks" / "index.html").read_text()
    assert "<!-- benchmark:" not in bench and "ONNX INT8 u8 (chosen)" in bench
    assert "median pruner" in bench  # the tuning figures, from results/tuning.json
    config = (site / "reference" / "config" / "index.html").read_text()
    assert "guard.max_drop" in config and "federation.round_timeout" in config


def test_every_benchmark_renderer_has_its_place_on_the_page():
    """Each table benchmarks/report.py renders from results/*.json is on the benchmarks page."""
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    page = (DOCS / "benchmarks.md").read_text()
    assert [n for n in report.SECTIONS if f"<!-- benchmark: {n} -->" not in page] == []


def test_every_registered_command_and_option_is_in_the_cli_page(site):
    """docs/reference/cli.md is generated from the parsers of the commands registered in
    ``fedyolo.commands``: each command, and each of its options, is on the built page."""
    from fl_server import plugins
    from fl_server.cli import commands

    page = _text(site / "reference" / "cli" / "index.html")
    registered = plugins.registered(plugins.COMMAND)
    assert registered, "no fedyolo.commands entry points: is fedyolo installed?"
    assert "<!-- cli-reference -->" not in page
    for name, add in commands().items():
        parser = argparse.ArgumentParser(prog=f"fedyolo {name}")
        add(parser)
        for command, options in _commands_and_options(parser):
            assert command in page, f"{command} is registered, not on the CLI page"
            missing = [o for o in options if f"{command} {o}" not in _options_of(page, command)]
            assert missing == [], f"{command}'s options {missing} are not on the CLI page"


def _commands_and_options(parser: argparse.ArgumentParser) -> list[tuple[str, list[str]]]:
    """The command (``parser.prog``) and its option strings, then its sub-commands' (argparse's
    list of a parser's arguments, ``_actions``, is the only way to walk them)."""
    out = [
        (
            parser.prog,
            [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")],
        )
    ]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _commands_and_options(sub)
    return out


def _options_of(page: str, command: str) -> str:
    """The CLI page's section of ``command`` (from its heading to the next), each of its words
    prefixed with the command, so an option is looked up in its own command's section."""
    section = page.split(f"{command} ¶", 1)[-1].split(" ¶", 1)[0]
    return " ".join(f"{command} {word}" for word in section.split())


@pytest.mark.parametrize(
    ("page", "names"),
    [
        ("python", ["run", "distill", "Summary"]),
        ("engines", ["names", "get"]),
        ("records", ["EventKind", "Status"]),
        ("wire", ["RoundConfig", "WireError"]),
        ("hooks", ["RoundHook", "load_hooks"]),
        ("strategies", ["build_strategy", "GuardedStrategy"]),
    ],
)
def test_api_pages_render_the_public_names(site, page, names):
    """mkdocstrings rendered each API page from the sources (not an empty ``:::`` line)."""
    text = _text(site / "reference" / "api" / page / "index.html")
    assert ":::" not in text
    assert [n for n in names if n not in text] == []


def test_site_fetches_nothing():
    """No web fonts, no external stylesheets or scripts: the site works offline."""
    cfg = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^\s+font: false$", cfg, re.M)
    assert "extra_css" not in cfg and "extra_javascript" not in cfg


def test_every_event_kind_is_documented_and_vice_versa():
    documented = _table_first_column(DOCS / "reference" / "events.md", "Events")
    written = {kind.value for kind in EventKind}
    assert written - documented == set(), (
        "events the code writes but docs/reference/events.md lacks"
    )
    assert documented - written == set(), "events docs/reference/events.md lists but no code writes"


def test_every_status_is_documented_and_vice_versa():
    documented = _table_first_column(DOCS / "reference" / "events.md", "Statuses")
    written = {status.value for status in Status}
    assert set(STOP_STATUSES) <= written  # what a round hook may ask for is a status
    assert written == documented


@pytest.mark.parametrize(
    ("heading", "typed"), [("Round records", RoundRecord), ("Client entries", ClientEntry)]
)
def test_every_round_record_key_is_documented_and_vice_versa(heading, typed):
    """``metrics.jsonl``'s keys as typed in ``fl_server.records`` equal the page's table."""
    documented = _table_first_column(DOCS / "reference" / "run-directory.md", heading)
    assert documented == set(typed.__annotations__)


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
