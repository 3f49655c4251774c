"""mkdocs hook: the pages' tables that must not drift are rendered from their sources at build.

- ``<!-- benchmark: NAME -->`` becomes the table ``benchmarks/report.py`` renders from
  ``benchmarks/results/*.json`` (the same code that prints them on the command line);
- ``<!-- config-reference -->`` becomes one table per file of ``configs/`` (every key, its
  default and its comment, read from the YAML files themselves).

Registered in ``mkdocs.yml`` (``hooks:``); it reads local files only, nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
BENCHMARK = re.compile(r"<!--\s*benchmark:\s*([a-z_]+)\s*-->")
CONFIG_REFERENCE = "<!-- config-reference -->"
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


def config_file_table(path: Path) -> str:
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
        lines += [" ".join(doc), ""]
    lines += ["| key | default | what it is |", "| --- | --- | --- |"]
    for k in keys:
        value = f"`{_cell(k.value)}`" if k.value else ""
        lines.append(f"| `{k.path}` | {value} | {_cell(' '.join(k.comment))} |")
    return "\n".join([*lines, ""])


def config_files() -> list[Path]:
    """``config.yaml`` first, then the groups' files in path order."""
    rest = sorted(p for p in CONFIGS.rglob("*.yaml") if p != CONFIGS / "config.yaml")
    return [CONFIGS / "config.yaml", *rest]


def config_reference() -> str:
    return "\n".join(config_file_table(p) for p in config_files())


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs' API)
    if CONFIG_REFERENCE in markdown:
        markdown = markdown.replace(CONFIG_REFERENCE, config_reference())
    return benchmark_tables(markdown)
