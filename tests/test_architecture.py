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


# The subpackages in data-flow order: a module imports only modules of its own
# subpackage, of the ones before it, and the base modules (BASE), never one after it.
LAYERS = ("data", "model", "objectives", "training", "evaluation", "planning", "interop",
          "recipes")
BASE = ("t5x_like.launch", "t5x_like.cluster", "t5x_like.process")  # imported by all, importing no subpackage


def _name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


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


def _is_package(name: str) -> bool:
    return name == "t5x_like" or name.removeprefix("t5x_like.") in LAYERS


def _graph():
    """Module -> the package modules it imports. Packages' __init__ files hold no code
    (their own test), so importing `t5x_like.data` for `from t5x_like.data import store`
    is not an edge; the module is."""
    modules = _modules()
    return {name: {m for m in _imported(tree, modules) & set(modules)
                   if not _is_package(m) and m != name}
            for name, tree in modules.items() if not _is_package(name)}


def _layer(name: str) -> str:
    """A module's place: its subpackage, "base", or "entry" (a `python -m` command)."""
    parts = name.split(".")
    if len(parts) == 3:
        return parts[1]
    return "base" if name in BASE else "entry"


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


def test_subpackages_import_only_the_ones_before_them():
    graph = _graph()
    assert {_layer(n) for n in graph} == {*LAYERS, "base", "entry"}
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = []
    for name, deps in graph.items():
        layer = _layer(name)
        for dep in deps:
            dep_layer = _layer(dep)
            if dep_layer == "entry" or (layer == "base" and dep_layer != "base") or (
                    layer in rank and dep_layer in rank and rank[dep_layer] > rank[layer]):
                upward.append(f"{name} -> {dep}")
    assert upward == []


def test_entry_points_only_start_the_process_and_call_their_module():
    """`t5x_like/<entry>.py` is the command; its code lives in a subpackage."""
    graph = _graph()
    for name, deps in graph.items():
        if _layer(name) == "entry":
            assert len(deps - {"t5x_like.process"}) == 1, (name, deps)
            assert len(_functions_of(PACKAGE / f"{name.split('.')[-1]}.py")) == 0, name


def test_package_init_files_have_no_code():
    """Importing t5x_like or a subpackage runs nothing: the top package holds the lazy
    public API (names resolved on first use), the subpackages a docstring."""
    for path in sorted(PACKAGE.rglob("__init__.py")):
        tree = ast.parse(path.read_text())
        body = tree.body[1:] if ast.get_docstring(tree) else tree.body
        if path.parent != PACKAGE:
            assert body == [], path
            continue
        allowed = (ast.Import, ast.ImportFrom, ast.If, ast.Assign, ast.FunctionDef)
        assert all(isinstance(node, allowed) for node in body), path
        for node in body:
            if isinstance(node, ast.If):
                assert getattr(node.test, "id", "") == "TYPE_CHECKING", path
            if isinstance(node, ast.Assign):  # a literal table, or __all__ = sorted(...)
                value = node.value
                if isinstance(value, ast.Call):
                    assert ast.unparse(value) == "sorted(_EXPORTS)", path
                else:
                    ast.literal_eval(value)  # raises on anything but a literal


def test_importing_the_package_imports_no_jax_and_restarts_nothing():
    import subprocess
    import sys

    code = ("import os, sys, t5x_like; print(os.getpid(), sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('jax', 'tensorflow', 'seqio', 'gin', 't5x_like')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split(" ", 1)
    assert out[1].strip() == "['t5x_like']"


def test_no_library_module_imports_the_shipped_tasks():
    modules = _modules()
    offenders = sorted(name for name, tree in modules.items() if "tasks" in _imported(tree, modules))
    assert offenders == [], "gin files import tasks; library modules never do"


def test_the_graph_has_the_expected_direction():
    """Spot checks of the data flow beyond the layers: the training run is imported
    only by recipes (DoReMi runs it twice), the data layer never sees a mesh."""
    graph = _graph()
    assert [n for n, deps in graph.items() if "t5x_like.training.train" in deps
            and _layer(n) not in ("recipes", "entry")] == []
    assert "t5x_like.model.network" not in graph["t5x_like.model.partitioning"]
    assert "t5x_like.data.prepare" not in graph["t5x_like.training.loader"]


def _functions_of(path):
    return [node for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in _functions_of(path):
            yield path.relative_to(PACKAGE).as_posix(), node.name, node.end_lineno - node.lineno + 1


def test_functions_are_short():
    long = [(f, name, n) for f, name, n in _functions()
            if n > (MAX_TRAIN_LINES if (f, name) == ("training/train.py", "train")
                    else MAX_FUNCTION_LINES)]
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
                    module = stmt.module.removeprefix("t5x_like.")
                    typed[alias.asname or alias.name] = (module, alias.name)
    table = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "_EXPORTS")
    assert typed == table
