"""No import cycles among the project's own modules: every module depends downward only.

Reads every module of the package from its source (AST, nothing is imported), resolves
relative and `granite_deploy.*` imports to project modules (imports under
`if TYPE_CHECKING:` excluded: they never run), and fails naming each cycle found.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# pyproject maps these top-level folders into the granite_deploy namespace
PACKAGES = {"granite_deploy": "granite_deploy", "export": "granite_deploy.export",
            "engines": "granite_deploy.engines", "serve": "granite_deploy.serve",
            "protos": "granite_deploy.protos"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in PACKAGES.items():
        for f in sorted((REPO / folder).glob("*.py")):
            mods[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.stem == "__init__" else mod.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                # a package's __init__ re-exporting its modules is not a dependency of theirs
                if t and t != mod and mods[t].stem != "__init__":
                    edges[mod].add(t)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m)
    return cycles


def test_the_scan_sees_the_whole_package():
    edges = import_graph()
    assert "granite_deploy.serve.server" in edges and "granite_deploy.export.exporter" in edges
    assert "granite_deploy.serve.session" in edges["granite_deploy.serve.server"]


def test_the_scan_finds_a_cycle_when_there_is_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
