"""The package's shape: imports run one way, functions stay short, the repo explains
itself, the public API lists where each name lives.

Read from the source with `ast` (nothing is imported), so a function-level import
counts as much as a module-level one.
"""

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "t5x_like"
MAX_FUNCTION_LINES = 80
MAX_TRAIN_LINES = 90


def _modules() -> dict[str, ast.Module]:
    return {f"t5x_like.{p.stem}" if p.stem != "__init__" else "t5x_like":
            ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imported(tree: ast.Module, modules) -> set[str]:
    """The package modules (and top-level packages) that `tree` imports, anywhere."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                out.add(name)
            elif name.split(".")[0] != "t5x_like":
                out.add(name.split(".")[0])
    return out


def _graph():
    modules = _modules()
    # The package's __init__ only re-exports (under TYPE_CHECKING or lazily); it is not
    # an edge of the data flow.
    return {name: _imported(tree, modules) & set(modules) - {"t5x_like", name}
            for name, tree in modules.items() if name != "t5x_like"}


def test_the_import_graph_of_the_package_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_library_module_imports_the_shipped_tasks():
    modules = _modules()
    offenders = sorted(name for name, tree in modules.items() if "tasks" in _imported(tree, modules))
    assert offenders == [], "gin files import tasks; library modules never do"


def test_the_graph_has_the_expected_direction():
    """Spot checks of the data flow: entry points on top, the model layer below."""
    graph = _graph()
    assert "t5x_like.train" not in graph["t5x_like.evaluation"]
    assert "t5x_like.network" not in graph["t5x_like.partitioning"]
    assert "t5x_like.prepare" not in graph["t5x_like.loader"]
    # doremi runs train twice (reference and proxy): the one entry point above train.
    for entry in ("t5x_like.train", "t5x_like.evaluation", "t5x_like.eval", "t5x_like.plan"):
        assert not any(entry in deps for name, deps in graph.items()
                       if name not in ("t5x_like.train", "t5x_like.eval", "t5x_like.doremi")
                       ), entry
    assert not any("t5x_like.doremi" in deps for deps in graph.values())


def _functions():
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, node.name, node.end_lineno - node.lineno + 1


def test_functions_are_short():
    long = [(f, name, n) for f, name, n in _functions()
            if n > (MAX_TRAIN_LINES if (f, name) == ("train.py", "train") else MAX_FUNCTION_LINES)]
    assert long == []


_OUTSIDE = re.compile(r"shared/|\bSPEC\b|DESIGN\.md")


def test_nothing_points_outside_the_repository():
    places = [PACKAGE, REPO / "tasks", REPO / "gin_configs", REPO / "docs", REPO / "bench",
              REPO / "scripts", REPO / "README.md", REPO / "pyproject.toml"]
    hits = []
    for place in places:
        files = [place] if place.is_file() else sorted(
            p for p in place.rglob("*") if p.is_file() and p.suffix in (".py", ".gin", ".md", ".sh")
            # hidden folders are not the repo's (bench/.maxtext-venv: MaxText's own venv)
            and not any(part.startswith(".") for part in p.relative_to(REPO).parts))
        for path in files:
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if _OUTSIDE.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert hits == []


def test_public_api_imports_match_the_lazy_table():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    typed = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for stmt in node.body:
                for alias in stmt.names:
                    typed[alias.asname or alias.name] = (stmt.module.split(".")[-1], alias.name)
    table = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "_EXPORTS")
    assert typed == table
