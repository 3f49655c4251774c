"""mkdocs hook: the pages' tables that must not drift are rendered from their sources at build.

- ``<!-- benchmark: NAME -->`` becomes the table ``benchmarks/report.py`` renders from
  ``benchmarks/results/*.json`` (the same code that prints them on the command line);
- ``<!-- config-reference -->`` becomes one table per file of ``configs/`` (every key, its
  default and its comment, read from the YAML files themselves; its type and allowed values
  from the schema, ``fl_server.schema``); a schema key no file documents fails the build;
- ``<!-- cli-reference -->`` becomes every ``fedyolo`` command, sub-command and option, read from
  the real argparse parsers of the commands registered in ``fedyolo.commands``
  (``fl_server.cli.build_parser``): what ``fedyolo COMMAND --help`` says.

Registered in ``mkdocs.yml`` (``hooks:``); it reads local files only, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, NoneType

from fl_server import schema
from fl_server.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
BENCHMARK = re.compile(r"<!--\s*benchmark:\s*([a-z0-9_]+)\s*-->")
CONFIG_REFERENCE = "<!-- config-reference -->"
CLI_REFERENCE = "<!-- cli-reference -->"
# Files outside the Hydra tree: how their keys are set.
OUTSIDE = {
    "edge/export.yaml": "`fedyolo export MODEL key=value ...`",
    "edge/bench.yaml": "`fedyolo bench MODEL... key=value ...`",
    "deploy/aws.yaml": "`fedyolo deploy aws COMMAND key=value ...`",
    "tuning/spaces/default.yaml": "`tuning.space=PATH` (a file like this one)",
}
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<item>-\s+)?(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")


def _report() -> ModuleType:
    """``benchmarks/report.py`` (a script folder, not a package), imported by path."""
    spec = importlib.util.spec_from_file_location(
        "fedyolo_benchmarks_report", ROOT / "benchmarks" / "report.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_tables(markdown: str) -> str:
    report = _report()

    def table(match: re.Match) -> str:
        name = match.group(1)
        if name not in report.SECTIONS:
            raise ValueError(f"<!-- benchmark: {name} -->: no such section in benchmarks/report.py")
        return "\n".join(report.SECTIONS[name]())

    return BENCHMARK.sub(table, markdown)


@dataclass
class Key:
    path: str
    value: str
    comment: list[str] = field(default_factory=list)


def _split_comment(rest: str) -> tuple[str, str]:
    """``value  # comment`` → (value, comment); a ``#`` inside quotes is part of the value."""
    quote = None
    for i, ch in enumerate(rest):
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1 :].strip()
    return rest.strip(), ""


def parse_yaml_keys(text: str, prefix: str = "") -> tuple[list[str], list[Key]]:
    """The file's leading comment and every key (dotted path, default, comment), in order."""
    doc: list[str] = []
    keys: list[Key] = []
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            words = stripped.lstrip("#").strip()
            (keys[-1].comment if keys else doc).append(words)
            continue
        m = KEY_LINE.match(line)
        if m is None:  # a list item of scalars, a continued value
            continue
        indent = len(m["indent"]) + (len(m["item"]) if m["item"] else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value, comment = _split_comment(m["rest"])
        if m["item"] and stack and stack[-1][1] == "defaults":  # Hydra's defaults list
            path, comment = m["key"], f"config group. {comment}".strip()
        else:
            path = (stack[-1][1] + "." if stack else prefix) + m["key"]
        keys.append(Key(path, value, [comment] if comment else []))
        if not value:
            stack.append((indent, path))
    return doc, keys


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    """A table cell of prose: ``high[, log][, step]`` is text, not a cross-reference
    (mkdocs-autorefs reads ``[a][b]`` as one), and ``runs/<name>`` is text, not a tag."""
    return _cell(text).replace("[", "\\[").replace("<", "&lt;")


def type_name(kind: object) -> str:
    """``Optional[int]`` → ``int or null``; ``list[str]`` → ``list of str``; ``Any`` → ``any``."""
    if kind is typing.Any:
        return "any"
    args = typing.get_args(kind)
    if typing.get_origin(kind) is list:
        return f"list of {type_name(args[0])}"
    if args and NoneType in args:
        return " or ".join(type_name(a) for a in args if a is not NoneType) + " or null"
    return getattr(kind, "__name__", str(kind))


def schema_keys(rel: str) -> dict[str, tuple[str, str]]:
    """The schema's (type, allowed values) of the keys of ``configs/<rel>``, by dotted key."""
    if rel.split("/")[0] in ("edge", "deploy", "tuning"):  # outside the run's schema
        return {}
    if rel.startswith("engine/"):
        cls = schema.ENGINES.get(Path(rel).stem, schema.EngineConfig)
        found = schema.all_keys(cls, "engine.")
    else:
        found = schema.all_keys()
    return {key: (type_name(kind), allowed) for key, kind, allowed in found}


# Keys of the schema that no YAML file holds: fedyolo writes them into a run's config.yaml.
SET_BY_FEDYOLO = {"trusted_plugins"}


def config_file_table(path: Path, documented: set[str] | None = None) -> str:
    rel = path.relative_to(CONFIGS).as_posix()
    group = rel.split("/")[0] if "/" in rel else ""
    prefix = "" if rel in OUTSIDE or not group else group + "."
    doc, keys = parse_yaml_keys(path.read_text(), prefix)
    how = OUTSIDE.get(rel, f"`{prefix}KEY=VALUE`" if prefix else "`KEY=VALUE`")
    name = path.stem
    chosen = (
        f"; chosen with `{group}={name}`"
        if group and rel not in OUTSIDE and group != "tuning"
        else ""
    )
    lines = [f"### `configs/{rel}`", "", f"Set with {how}{chosen}.", ""]
    if doc:
        lines += [" ".join(doc).replace("[", "\\["), ""]  # prose, as _prose says
    typed = schema_keys(rel)
    lines += ["| key | type | default | allowed | what it is |", "| --- | --- | --- | --- | --- |"]
    for k in keys:
        if k.path.endswith("defaults") and not k.value:  # Hydra's defaults list: the groups
            continue
        kind, allowed = typed.get(k.path, ("", ""))
        value = f"`{_cell(k.value)}`" if k.value else ""
        if documented is not None:
            documented.add(k.path)
        lines.append(
            f"| `{k.path}` | {_cell(kind)} | {value} | {_prose(allowed)} "
            f"| {_prose(' '.join(k.comment))} |"
        )
    return "\n".join([*lines, ""])


def config_files() -> list[Path]:
    """``config.yaml`` first, then the groups' files in path order."""
    rest = sorted(p for p in CONFIGS.rglob("*.yaml") if p != CONFIGS / "config.yaml")
    return [CONFIGS / "config.yaml", *rest]


def config_reference() -> str:
    documented: set[str] = set()
    tables = [config_file_table(p, documented) for p in config_files()]
    missing = [
        key
        for key, _, _ in schema.all_keys()
        if key not in documented | SET_BY_FEDYOLO
        and not any(d.startswith(key + ".") for d in documented)
    ]
    if missing:
        raise ValueError(f"schema keys that no file of configs/ documents: {missing}")
    return "\n".join(tables)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """A parser's sub-commands: (name, help, parser). argparse has no public accessor: its
    sub-parsers action holds them (``choices``, and the help in ``_choices_actions``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def cli_commands(
    parser: argparse.ArgumentParser | None = None, prefix: str = "fedyolo"
) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """Every registered command and sub-command, depth first: (``fedyolo data synth``, help,
    parser)."""
    out = []
    for name, help_, sub in _subcommands(parser or build_parser()):
        out.append((f"{prefix} {name}", help_, sub))
        out += cli_commands(sub, f"{prefix} {name}")
    return out


def _option_row(action: argparse.Action, prog: str) -> str:
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    takes = "" if action.nargs == 0 else f" {metavar}"
    many = " ..." if action.nargs in ("*", "+", argparse.REMAINDER) else ""
    name = ", ".join(f"{o}{takes}" for o in action.option_strings) or f"{metavar}{many}"
    help_ = (action.help or "") % {**vars(action), "prog": prog} if action.help else ""
    shown = action.default not in (None, False, argparse.SUPPRESS, [])
    default = f"`{_cell(str(action.default))}`" if shown and action.option_strings else ""
    return f"| `{_cell(name)}` | {_prose(help_)} | {default} |"


def _command_section(path: str, help_: str, parser: argparse.ArgumentParser) -> list[str]:
    lines = [f"### `{path}`", "", help_ or "", "", "```text", parser.format_usage().strip()]
    lines += ["```", ""]
    shown = [
        a
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]
    if shown:
        lines += ["| argument | what it does | default |", "| --- | --- | --- |"]
        lines += [_option_row(a, parser.prog) for a in shown]
        lines.append("")
    return lines


def cli_reference() -> str:
    """The summary table of every command, then a section per command with its usage and its
    arguments (from the parsers; ``-h, --help`` left out)."""
    commands = cli_commands()
    lines = ["## Commands", "", "| command | what it does |", "| --- | --- |"]
    lines += [f"| [`{p}`](#{p.replace(' ', '-')}) | {_prose(h)} |" for p, h, _ in commands]
    lines += ["", "## Every command's arguments", ""]
    for path, help_, parser in commands:
        lines += _command_section(path, help_, parser)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs' API)
    if CLI_REFERENCE in markdown:
        markdown = markdown.replace(CLI_REFERENCE, cli_reference())
    if CONFIG_REFERENCE in markdown:
        markdown = markdown.replace(CONFIG_REFERENCE, config_reference())
    return benchmark_tables(markdown)
