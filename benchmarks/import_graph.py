"""The import graph of fedyolo's packages: cycles, imports that run up the layers, and more.

Why: an import written inside a function hides a dependency from the module's head, so a cycle
or an import of a higher layer goes unnoticed until it breaks (issue 29, item 5). This reads the
source with ``ast`` (nothing is imported) and counts every import, at module level or inside a
function, of one fedyolo module by another. The layers, bottom to top: ``fl_client`` (what a
robot installs), ``strategies``, ``fl_server``, then ``tuning`` and ``deploy``; a module may
import its own layer and those below, and ``strategies`` also ``fl_server``'s floor (``FLOOR``:
its record types, plug-in trust rule and config schema, which import nothing above
``fl_client``). ``tests/fl_server/test_layers.py`` asserts the graph has
no cycle and no upward import. Heavy optional dependencies (torch, Optuna, ...) are imported on
first use through ``fl_client.lazy.lazy("name")``; those uses are counted apart (``lazy``).

    .venv/bin/python benchmarks/import_graph.py            # the report
    .venv/bin/python benchmarks/import_graph.py --json     # the same as JSON
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fl_client", "strategies", "fl_server", "tuning", "deploy")
# what each package may NOT import (the layers above it)
FORBIDDEN = {
    "fl_client": ("fl_server", "strategies", "tuning", "deploy"),
    "strategies": ("fl_server", "tuning", "deploy"),
    "fl_server": ("tuning", "deploy"),
}
# fl_server's floor: the modules of fl_server that strategies (the layer below) may import, because
# they import nothing of fl_server outside this floor and nothing of strategies (the run's record
# types, the plug-in trust rule and the config schema; tests/fl_server/test_layers.py checks it)
FLOOR = frozenset({"fl_server.records", "fl_server.plugins", "fl_server.schema"})
LOGGER = logging.getLogger("fedyolo.import_graph")


@dataclass(frozen=True)
class Import:
    """``importer`` imports ``imported`` (both fedyolo modules) at ``line``."""

    importer: str
    imported: str
    line: int
    in_function: bool


def module_name(path: Path, root: Path = ROOT) -> str:
    """``fl_client/data/formats.py`` -> ``fl_client.data.formats`` (a package is its __init__)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the layered packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def _resolve(name: str, known: set[str]) -> str | None:
    """The fedyolo module ``name`` refers to: itself, or its longest known parent."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_pkg: bool) -> list[str]:
    """The dotted names an import statement may load (a ``from`` import may name submodules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_pkg else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    """Every import of another fedyolo module in ``path``, each with whether it is in a function."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                seen: set[str] = set()
                for target in _targets(child, name, path.name == "__init__.py"):
                    imported = _resolve(target, known)
                    if imported and imported != name and imported not in seen:
                        seen.add(imported)
                        found.append(Import(name, imported, child.lineno, in_function))
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(child, inner)

    visit(tree, False)
    return found


def lazy_uses(path: Path) -> list[str]:
    """The dependencies ``path`` names through ``lazy("name")`` (``fl_client.lazy``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "lazy"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(node.args[0].value)
    return found


def graph(root: Path = ROOT) -> list[Import]:
    """Every import between fedyolo's modules."""
    mods = modules(root)
    known = set(mods)
    return [imp for name, path in mods.items() for imp in imports_of(name, path, known)]


def _parents(name: str) -> list[str]:
    """A module's enclosing packages: importing ``a.b.c`` runs ``a`` and ``a.b`` first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted.

    An edge from a package to its own submodule (``pkg/__init__`` importing ``pkg.x``) is not a
    cycle: Python runs the package first, by design, so such edges are left out.
    """
    succ: dict[str, set[str]] = {}
    for e in edges:
        if e.importer in _parents(e.imported) or e.imported in _parents(e.importer):
            continue
        succ.setdefault(e.importer, set()).add(e.imported)
        succ.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(succ):
        if v not in index:
            strongconnect(v)
    return sorted(found)


def upward(edges: list[Import]) -> list[Import]:
    """The imports that run up the layers (``FORBIDDEN``)."""
    out = []
    for e in edges:
        below = e.importer.split(".")[0]
        above = e.imported.split(".")[0]
        if above in FORBIDDEN.get(below, ()) and not (
            below == "strategies" and e.imported in FLOOR
        ):
            out.append(e)
    return out


def report(root: Path = ROOT) -> dict:
    """The numbers and the findings, JSON-ready."""
    edges = graph(root)
    ups = upward(edges)
    return {
        "modules": len(modules(root)),
        "imports": len(edges),
        "imports_in_functions": sum(e.in_function for e in edges),
        "lazy": {name: uses for name, path in modules(root).items() if (uses := lazy_uses(path))},
        "cycles": cycles(edges),
        "upward": [f"{e.importer}:{e.line} -> {e.imported}" for e in ups],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    result = report()
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    lines = [
        f"{result['modules']} modules, {result['imports']} imports between them "
        f"({result['imports_in_functions']} inside functions)",
        f"{sum(map(len, result['lazy'].values()))} heavy dependencies imported on first use "
        f"(fl_client.lazy) in {len(result['lazy'])} modules",
        f"{len(result['cycles'])} cycle(s):",
        *(f"  {' <-> '.join(c)}" for c in result["cycles"]),
        f"{len(result['upward'])} upward import(s):",
        *(f"  {u}" for u in result["upward"]),
    ]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
