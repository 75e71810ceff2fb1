"""No import cycles among the project's packages: every import counts, also those inside functions, since a
lazy import only hides a cycle in the design (two modules that each need the other) until it bites."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flowcache_jax", "models", "converters", "experiments")
Edge = tuple[str, str]  # (importing module, "path:line" of the import)


def project_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__.py)."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _deepest(name: str, modules: dict[str, Path]) -> str | None:
    """``a.b.c`` -> the longest prefix that is a project module (``a.b`` when c is a function of a.b)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path], root: Path) -> dict[str, str]:
    """Project modules ``module`` imports anywhere in its file -> where (the first line), relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    lines: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                base = ".".join([*pkg, *([base] if base else [])])
            names = [f"{base}.{a.name}" if base else a.name for a in node.names]
        for n in names:
            target = _deepest(n, modules)
            if target is not None and target != module:
                lines[target] = min(lines.get(target, node.lineno), node.lineno)
    return {t: f"{path.relative_to(root)}:{n}" for t, n in sorted(lines.items())}


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, dict[str, str]]:
    modules = project_modules(root, packages)
    return {m: imports_of(m, p, modules, root) for m, p in modules.items()}


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Cycles ([a, b, ..., a]): per strongly connected component (Tarjan), the shortest one through each of its
    modules, each cycle once, so every module caught in a cycle is named."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out: list[list[str]] = []
    for scc in sorted(sccs):
        for m in scc:
            c = _cycle_through(m, set(scc), graph)
            k = c.index(min(c[:-1]))
            c = [*c[k:-1], *c[:k], c[k]]  # rotated to start at its smallest name: the same cycle reads the same
            if c not in out:
                out.append(c)
    return out


def _cycle_through(start: str, members: set[str], graph: dict[str, dict[str, str]]) -> list[str]:
    """The shortest cycle through ``start`` inside its strongly connected component (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def describe(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    """``a -> b (a.py:3) -> a (b.py:7)``: each arrow with the import that makes it."""
    hops = [f"{b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join([cycle[0], *hops])


def test_no_import_cycles():
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 50  # the packages were found
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, graph) for c in cycles)


def test_the_checker_finds_cycles(tmp_path):
    """The walker on a made-up package: absolute, relative and function-level imports, and a clean one."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "def f():\n    from .sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..a import thing\nimport os\n",
        "d.py": "import pkg.a\nfrom pkg.sub.c import x\n",
        "e.py": "from . import f\n",
        "f.py": "from .. import nothing_outside\n",
        "g.py": "import pkg.h\n",
        "h.py": "import pkg.g\nimport pkg.i\n",
        "i.py": "from . import h\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.sub.c": "pkg/b.py:2"} and graph["pkg.sub.c"] == {"pkg.a": "pkg/sub/c.py:1"}
    assert set(graph["pkg.d"]) == {"pkg.a", "pkg.sub.c"} and set(graph["pkg.e"]) == {"pkg.f"}
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"], ["pkg.g", "pkg.h", "pkg.g"],
                      ["pkg.h", "pkg.i", "pkg.h"]]
    assert describe(cycles[0], graph) == ("pkg.a -> pkg.b (pkg/a.py:1) -> pkg.sub.c (pkg/b.py:2) -> "
                                          "pkg.a (pkg/sub/c.py:1)")
    for name in ("b.py", "h.py"):
        (pkg / name).write_text("")
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == []
