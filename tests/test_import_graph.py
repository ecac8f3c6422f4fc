"""The layers of lit_ar, read from the source: no import cycle, and data, metrics and evaluation never reach systems.

The graph is built with `ast`, not by importing: every `import` and `from ... import` counts wherever it stands (at
module level, in a function, under a condition), because an import deferred into a function still ties the two
modules together; it only hides the cycle until the function runs.
"""

import ast
import sys
from pathlib import Path
from typing import NamedTuple

import lit_ar

PACKAGE = Path(lit_ar.__file__).parent
# (layer, what it may not reach): lower layers stay importable and testable without the Lightning systems
FORBIDDEN = [(lower, "lit_ar.systems") for lower in ("lit_ar.data", "lit_ar.metrics", "lit_ar.evaluation")]


class Edge(NamedTuple):
    source: str
    target: str
    where: str  # "lit_ar/metrics.py:80 (in ClassifierFeatures.__init__)"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a relative import of `module` starts from (a package's own `__init__` starts from itself)."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class ImportVisitor(ast.NodeVisitor):
    """Every lit_ar module an `import` of `module` names, with the enclosing function or class of each."""

    def __init__(self, module: str, modules: dict[str, Path]):
        self.module, self.modules, self.scope = module, modules, []
        self.found: list[tuple[str, int, str]] = []  # (target module, line, scope)

    def _scoped(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def _add(self, target: str, node: ast.stmt) -> None:
        # importing a.b.c runs a/__init__ and a/b/__init__ too; the packages of `module` itself already ran
        own = set(ancestors(self.module)) | {self.module}
        for name in [*ancestors(target), target]:
            if name in self.modules and name not in own:
                self.found.append((name, node.lineno, ".".join(self.scope)))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: resolved against this module's package
            base = package_of(self.module, self.modules)
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        self._add(base, node)
        for alias in node.names:  # `from lit_ar.systems import tokenizer` imports the submodule as well
            if f"{base}.{alias.name}" in self.modules:
                self._add(f"{base}.{alias.name}", node)


def import_graph() -> tuple[list[str], list[Edge]]:
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    edges = []
    for name, path in modules.items():
        visitor = ImportVisitor(name, modules)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        rel = path.relative_to(PACKAGE.parent)
        for target, line, scope in visitor.found:
            if target != name:
                edges.append(Edge(name, target, f"{rel}:{line}" + (f" (in {scope})" if scope else "")))
    return sorted(modules), edges


def strongly_connected(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (every import cycle lies inside one)."""
    succ = {n: sorted({e.target for e in edges if e.source == n}) for n in nodes}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for n in nodes:
        if n not in index:
            visit(n)
    return out


def shortest_path(edges: list[Edge], start: str, goal, within: set[str] | None = None) -> list[Edge] | None:
    """Breadth-first: the fewest imports from `start` to a module for which `goal(module)` holds."""
    paths, frontier = {start: []}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in (e for e in edges if e.source == v):
                if goal(e.target):
                    return [*paths[v], e]
                if e.target not in paths and (within is None or e.target in within):
                    paths[e.target] = [*paths[v], e]
                    nxt.append(e.target)
        frontier = nxt
    return None


def describe(path: list[Edge]) -> str:
    return "\n".join(f"    {e.source} -> {e.target}   [{e.where}]" for e in path)


def test_graph_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The walker itself, on a made-up package: a function-level import and a relative one are edges."""
    pkg = tmp_path / "lit_ar"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from lit_ar import a\n")
    (pkg / "a.py").write_text("from lit_ar.sub import b\nfrom . import sub\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    _, edges = import_graph()
    pairs = {(e.source, e.target) for e in edges}
    assert pairs == {
        ("lit_ar.sub", "lit_ar.sub.b"),  # relative, from a package's __init__
        ("lit_ar.sub.b", "lit_ar.a"),  # function-level
        ("lit_ar.a", "lit_ar.sub"),  # the package of `from lit_ar.sub import b` runs first
        ("lit_ar.a", "lit_ar.sub.b"),  # and b is a submodule
    }
    assert next(e.where for e in edges if e.source == "lit_ar.sub.b") == "lit_ar/sub/b.py:2 (in f)"
    assert strongly_connected(*import_graph()) == [["lit_ar.a", "lit_ar.sub", "lit_ar.sub.b"]]


def test_no_import_cycle():
    nodes, edges = import_graph()
    cycles = []
    for component in strongly_connected(nodes, edges):
        members = set(component)
        start = component[0]
        back = shortest_path(edges, start, lambda m, s=start: m == s, within=members)
        inside = [e for e in edges if e.source in members and e.target in members]
        cycles.append(f"  cycle through {', '.join(component)}; e.g.\n{describe(back or [])}\n"
                      f"   every import among them:\n{describe(inside)}")  # fmt: skip
    assert not cycles, "lit_ar imports form cycles (move what the lower module needs below both):\n" + "\n".join(cycles)


def test_lower_layers_never_reach_systems():
    nodes, edges = import_graph()
    problems = []
    for lower, upper in FORBIDDEN:
        for module in (n for n in nodes if is_under(n, lower)):
            path = shortest_path(edges, module, lambda m, u=upper: is_under(m, u))
            if path:
                problems.append(f"  {module} reaches {path[-1].target}:\n{describe(path)}")
    assert not problems, "data, metrics and evaluation must not import lit_ar.systems:\n" + "\n".join(problems)
