"""The module graph of `registry` and `worker_agent` has no cycles.

Built from the source, not from what happens to be imported: every `import` statement counts,
wherever it stands (inside a function, under `TYPE_CHECKING`), because a lazy import that only
hides a circle is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("registry", "worker_agent")


def modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name (a package by its `__init__`)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def imports(module: str, source: str, known: dict[str, Path], *, is_package: bool) -> set[str]:
    """The modules of the packages that `module` imports, anywhere in its source."""
    edges: set[str] = set()
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_package, node)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    edges.add(target)  # a submodule
                elif base in known:
                    edges.add(base)  # a name defined in that module
    edges.discard(module)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_module_graph_is_read_from_every_import_statement() -> None:
    known = modules()
    assert "registry.models" in known and "worker_agent.agent" in known
    # A function-level import and a TYPE_CHECKING import are edges like any other.
    source = "def f():\n    from registry import models\nif TYPE_CHECKING:\n    from . import x\n"
    known["registry.x"] = ROOT / "registry" / "x.py"
    edges = imports("registry.probe", source, known, is_package=False)
    assert edges == {"registry.models", "registry.x"}


def test_cycles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_there_is_no_import_cycle(package: str) -> None:
    known = modules()
    graph = {
        name: imports(name, path.read_text(), known, is_package=path.name == "__init__.py")
        for name, path in known.items()
    }
    found = [c for c in cycles(graph) if c[0].split(".")[0] == package]
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
