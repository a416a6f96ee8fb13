"""The privacy boundary: only the client side may ever import the code that reads patient files.

The import graph of the project's own packages is built from the source with `ast` (every
import statement, at any depth: module level, inside functions, under TYPE_CHECKING, plus
`importlib.import_module("...")` with a literal name), then checked for reachability.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "client", "server", "strategies", "models", "privacy", "simulation", "mindfed")
SERVER_SIDE = ("server", "strategies", "models", "privacy")
FORBIDDEN = "client"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _literal_dynamic_import(node: ast.Call) -> str | None:
    """`importlib.import_module("x.y")`, `import_module("x.y")` or `__import__("x.y")`."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in {"import_module", "__import__"} or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def build_import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules whose import it triggers (directly)."""
    files: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[_module_name(path, root)] = path
    known = set(files)

    def add(targets: set[str], dotted: str) -> None:
        # Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c: an edge to each.
        targets.update(p for p in _prefixes(dotted) if p in known)

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        # A module's own parent packages are imported before it.
        for parent in _prefixes(module)[:-1]:
            add(targets, parent)
        package = module if _is_package(path) else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(targets, alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package.split(".") if package else []
                    anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                if not base:
                    continue
                add(targets, base)
                for alias in node.names:  # `from pkg import submodule`
                    if alias.name != "*":
                        add(targets, f"{base}.{alias.name}")
            elif isinstance(node, ast.Call):
                dotted = _literal_dynamic_import(node)
                if dotted:
                    add(targets, dotted)
        targets.discard(module)
        graph[module] = targets
    return graph


def import_chain(graph: dict[str, set[str]], start: str, is_target) -> list[str] | None:
    """Shortest import chain from `start` to a module matching `is_target` (BFS), or None."""
    parents: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        if module != start and is_target(module):
            chain = [module]
            while parents[chain[-1]] is not None:
                chain.append(parents[chain[-1]])
            return chain[::-1]
        for nxt in sorted(graph.get(module, ())):
            if nxt not in parents:
                parents[nxt] = module
                queue.append(nxt)
    return None


def _is_client(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return build_import_graph(ROOT, PACKAGES)


# --- the boundary -------------------------------------------------------------------------


@pytest.mark.parametrize("package", SERVER_SIDE)
def test_server_side_never_reaches_the_client_package(graph: dict[str, set[str]], package: str) -> None:
    modules = sorted(m for m in graph if m == package or m.startswith(package + "."))
    assert len(modules) >= 2, f"no modules found under {package}/: the check would be vacuous"
    leaks = {m: import_chain(graph, m, _is_client) for m in modules}
    leaks = {m: chain for m, chain in leaks.items() if chain is not None}
    assert not leaks, "privacy boundary crossed:\n" + "\n".join(
        " -> ".join(chain) for chain in leaks.values()
    )


def test_every_server_module_is_checked(graph: dict[str, set[str]]) -> None:
    server_modules = {m for m in graph if m.startswith("server.")}
    assert {"server.app", "server.federation", "server.export"} <= server_modules
    # server.app really is the root of a large graph (the walk is not trivially empty).
    reachable = {m for m in graph if import_chain(graph, "server.app", lambda x, m=m: x == m)}
    assert {"server.federation", "strategies.validating", "configs.settings", "models.registry"} <= reachable


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan): each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for nxt in sorted(graph.get(module, ())):
            if nxt not in index:
                visit(nxt)
                low[module] = min(low[module], low[nxt])
            elif nxt in on_stack:
                low[module] = min(low[module], index[nxt])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_among_the_projects_modules(graph: dict[str, set[str]]) -> None:
    assert import_cycles(graph) == []


def test_model_registry_is_a_leaf(graph: dict[str, set[str]]) -> None:
    # Built-in models are named by import path, so the registry imports none of them.
    assert graph["models.registry"] <= {"models"}, graph["models.registry"]


# --- positive controls: the checker can fail ------------------------------------------------


def test_positive_control_cycle_is_found(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.c import g\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "import pkg.a\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert import_cycles(build_import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_positive_control_client_app_reaches_client_data(graph: dict[str, set[str]]) -> None:
    assert import_chain(graph, "client.app", lambda m: m == "client.data") == ["client.app", "client.data"]
    # Transitive, through a module that is not client.app.
    chain = import_chain(graph, "client.tasks", lambda m: m == "client.data")
    assert chain is not None


def test_positive_control_function_local_imports_count(graph: dict[str, set[str]]) -> None:
    # mindfed.cli imports client.data inside a function; the graph must still see it.
    assert "client.data" in graph["mindfed.cli"]
    # configs.settings imports models.registry lazily in a validator.
    assert "models.registry" in graph["configs.settings"]


def test_checker_catches_relative_and_transitive_leaks(tmp_path: Path) -> None:
    files = {
        "client/__init__.py": "",
        "client/data.py": "PATIENTS = 1\n",
        "server/__init__.py": "",
        "server/app.py": "from server import helpers\n",
        "server/helpers.py": "def f():\n    from ..shared import util\n",
        "server/lazy.py": "import importlib\nimportlib.import_module('client.data')\n",
        "shared/__init__.py": "",
        "shared/util.py": "from client.data import PATIENTS\n",
        "strategies/__init__.py": "",
        "strategies/clean.py": "import os\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    fake = build_import_graph(tmp_path, ("client", "server", "shared", "strategies"))
    assert import_chain(fake, "server.app", _is_client) == [
        "server.app",
        "server.helpers",
        "shared.util",
        "client",
    ]
    assert import_chain(fake, "server.lazy", _is_client) is not None
    assert import_chain(fake, "strategies.clean", _is_client) is None


# --- the real interpreter agrees ------------------------------------------------------------


def test_importing_the_server_app_loads_no_client_module() -> None:
    code = (
        "import sys, server.app\n"
        "assert 'client.data' not in sys.modules, 'client.data imported'\n"
        "leaked = sorted(m for m in sys.modules if m == 'client' or m.startswith('client.'))\n"
        "assert not leaked, leaked\n"
        "assert 'server.federation' in sys.modules\n"
    )
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
