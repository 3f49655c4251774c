"""fedyolo's packages import each other only downwards, in no cycle, and change nothing at import.

The graph is ``benchmarks/import_graph.py``'s (``ast``, imports inside functions included): an
import written inside a function still counts. Layers, bottom to top: ``fl_client``,
``strategies``, ``fl_server``, then ``tuning`` and ``deploy`` (issue 29, item 5).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

from fl_server import plugins

ROOT = Path(__file__).resolve().parents[2]


def _load_import_graph():
    """benchmarks/import_graph.py, loaded by path: putting benchmarks/ on sys.path would shadow
    the ``tuning`` package with benchmarks/tuning.py for every later test."""
    path = ROOT / "benchmarks" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


import_graph = _load_import_graph()

# Cycles that cannot be broken in this change, each with its reason. Remove an entry when its
# cycle is gone (the test below says so).
ALLOWED_CYCLES: dict[tuple[str, ...], str] = {}


def test_no_import_cycle_among_fedyolos_modules():
    found = {tuple(c) for c in import_graph.cycles(import_graph.graph())}
    unexpected = found - set(ALLOWED_CYCLES)
    assert not unexpected, f"import cycles: {sorted(unexpected)}"
    gone = set(ALLOWED_CYCLES) - found
    assert not gone, f"these cycles are gone: remove them from ALLOWED_CYCLES: {sorted(gone)}"


def test_no_import_runs_up_the_layers():
    ups = import_graph.upward(import_graph.graph())
    assert not ups, "imports of a higher layer:\n" + "\n".join(
        f"{e.importer}:{e.line} imports {e.imported}" for e in ups
    )


def test_fl_servers_floor_imports_nothing_above_fl_client():
    """strategies may import fl_server's floor only because the floor imports only fl_client and
    itself: were a floor module to import fl_server's rest or strategies, strategies would run up
    the layers through it."""
    assert import_graph.FLOOR, "the floor names the modules strategies may import"
    edges = import_graph.graph(ROOT)
    above = [
        f"{e.importer} -> {e.imported}"
        for e in edges
        if e.importer in import_graph.FLOOR
        and not e.imported.startswith("fl_client")
        and e.imported not in import_graph.FLOOR
    ]
    assert not above, f"fl_server's floor imports above fl_client: {above}"
    seen = {e.imported for e in edges if e.importer.startswith("strategies.")}
    outside = sorted(m for m in seen if m.startswith("fl_server") and m not in import_graph.FLOOR)
    assert not outside, f"strategies imports fl_server outside its floor: {outside}"


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The checker itself: a cycle made only of imports inside functions is found, and so is an
    upward import written in a function."""
    pkg = tmp_path / "fl_client"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fl_client import b\n")
    (pkg / "b.py").write_text("def g():\n    from fl_client.a import f\n")
    (pkg / "c.py").write_text("def h():\n    import fl_server.x\n")
    server = tmp_path / "fl_server"
    server.mkdir()
    (server / "x.py").write_text("")
    edges = import_graph.graph(tmp_path)
    assert import_graph.cycles(edges) == [["fl_client.a", "fl_client.b"]]
    assert [(e.importer, e.imported) for e in import_graph.upward(edges)] == [
        ("fl_client.c", "fl_server.x")
    ]


def test_the_graph_counts_lazy_helper_uses_apart(tmp_path):
    """A heavy dependency named through ``fl_client.lazy`` is counted as such, not as an import
    of a fedyolo module, and an import at module level is not one inside a function."""
    pkg = tmp_path / "fl_client"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "lazy.py").write_text("def lazy(name):\n    return name\n")
    (pkg / "user.py").write_text(
        "from fl_client.lazy import lazy\n\ntorch = lazy('torch')\noptuna = lazy('optuna')\n"
    )
    result = import_graph.report(tmp_path)
    assert result["lazy"] == {"fl_client.user": ["torch", "optuna"]}
    assert result["imports"] == 1 and result["imports_in_functions"] == 0


def test_data_preparation_lives_on_the_server_side():
    """The synthetic fleet, the checks, partitioning and dataset loading are the server's (issue
    29, item 5); the client keeps what it reads of its shard."""
    names = set(import_graph.modules())
    server = {"synth", "partition", "check", "layout", "coco", "samples"}
    assert {f"fl_server.data.{n}" for n in server} <= names
    assert not {f"fl_client.data.{n}" for n in server} & names
    assert {"fl_client.data.formats", "fl_client.data.labels", "fl_client.data.errors"} <= names


def _environment_changes_at_import(path: Path) -> list[str]:
    """Statements outside functions and classes' methods that write ``os.environ``."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Expr | ast.Assign | ast.AugAssign | ast.Delete):
                text = ast.unparse(child)
                if "environ" in text or "putenv" in text:
                    found.append(f"{path.relative_to(ROOT)}:{child.lineno}: {text}")
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_importing_a_module_changes_no_environment_variable():
    """Each entry point (the CLI, the ServerApp's and ClientApp's handlers, the warm worker's
    main, the library's ``run``) sets what it needs; importing a module sets nothing."""
    found = [
        line
        for path in import_graph.modules().values()
        for line in _environment_changes_at_import(path)
    ]
    assert not found, "environment changed at import:\n" + "\n".join(found)


# What ``deploy`` may use of ``fl_server`` (issue 29, item 5): the API published for engines, the
# config composer, the user's API; and a registered command's module, the dispatcher's
# ``setup_logging`` as ``fl_server``'s and ``tuning``'s commands do. The rest may change freely.
PUBLISHED = {"fl_server.engines", "fl_server.config", "fl_server.api"}
FOR_COMMANDS = {"fl_server.cli"}


def _fl_server_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of each ``fl_server`` module ``path`` imports, in functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "fl_server":
            found += [(node.lineno, f"fl_server.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return [(line, m) for line, m in found if m.split(".")[0] == "fl_server"]


def deploy_uses_of_unpublished_fl_server(root: Path = ROOT) -> list[str]:
    commands = {v.split(":")[0] for v in plugins.registered(plugins.COMMAND).values()}
    found = []
    for path in sorted((root / "deploy").rglob("*.py")):
        module = import_graph.module_name(path, root)
        if module.startswith("deploy.aws"):  # another issue replaces it
            continue
        allowed = PUBLISHED | (FOR_COMMANDS if module in commands else set())
        found += [
            f"{module}:{line} imports {m}"
            for line, m in _fl_server_imports(path)
            if m not in allowed
        ]
    return found


def test_deploy_uses_only_fl_servers_published_api():
    found = deploy_uses_of_unpublished_fl_server()
    assert not found, "use fl_server.engines (or add to its __all__):\n" + "\n".join(found)
