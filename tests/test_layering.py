"""The stack is one-way: planner -> passes -> runtime -> codegen, and no module imports itself
back through others. Every import is read from the source with ``ast`` (module level, inside
functions and under ``TYPE_CHECKING`` alike), mapped to the module it names and checked:

* a module of a lower package never imports one of a higher package;
* the module graph has no cycle (no strongly connected component of more than one module).

Violations that other parts of the tree still carry are listed in ``KNOWN_*`` below, each with
the reason it remains; the test fails on any violation not listed, and on a listed one that is
gone (so the lists shrink as the tree is fixed).
"""
from __future__ import annotations

import ast
import os

import networkx as nx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ("planner", "passes", "runtime", "codegen")     # higher first: arrows point right

#: (importer, imported) edges against the order allowed to remain (none)
KNOWN_UPWARD: set = set()

#: cycles (as sorted module tuples) allowed to remain (none)
KNOWN_CYCLES: set = set()


def _modules() -> dict:
    """module name -> path, for every .py under the four packages."""
    mods = {}
    for pkg in ORDER:
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                mods[".".join(rel)] = os.path.join(dirpath, f)
    return mods


def _resolve(name: str, mods: dict):
    """The longest prefix of a dotted name that is one of ``mods`` (None: outside them)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def _imports(module: str, path: str, mods: dict) -> set:
    """The modules of ``mods`` that ``module`` imports anywhere in its source."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # ``from a import b``: the submodule a.b where there is one, else a itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                     for a in node.names]
        else:
            continue
        for n in names:
            target = _resolve(n, mods)
            if target is not None and target != module:
                out.add(target)
    return out


def _graph() -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for m, path in mods.items():
        g.add_edges_from((m, t) for t in _imports(m, path, mods))
    return g


def _rank(module: str) -> int:
    return ORDER.index(module.split(".", 1)[0])


def upward_imports(g: nx.DiGraph) -> set:
    return {(a, b) for a, b in g.edges if _rank(b) < _rank(a)}


def import_cycles(g: nx.DiGraph) -> set:
    return {tuple(sorted(c)) for c in nx.strongly_connected_components(g) if len(c) > 1}


def test_the_import_graph_is_read_from_every_package():
    g = _graph()
    assert {m.split(".")[0] for m in g} == set(ORDER)
    assert ("passes.schedule", "runtime.plan") in g.edges            # a module-level import
    assert ("runtime.plan", "runtime.costmodel") in g.edges          # one inside a function


def test_no_lower_package_imports_a_higher_one():
    found = upward_imports(_graph())
    assert found - KNOWN_UPWARD == set(), f"imports against {' > '.join(ORDER)}: {sorted(found - KNOWN_UPWARD)}"
    assert KNOWN_UPWARD - found == set(), f"fixed, drop from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - found)}"


def test_no_import_cycles():
    found = import_cycles(_graph())
    assert found - KNOWN_CYCLES == set(), f"import cycles: {sorted(found - KNOWN_CYCLES)}"
    assert KNOWN_CYCLES - found == set(), f"fixed, drop from KNOWN_CYCLES: {sorted(KNOWN_CYCLES - found)}"
