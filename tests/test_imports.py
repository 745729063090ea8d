"""kdray's modules import each other without cycles.

A cycle works only while the modules happen to be imported in one order and breaks
the first time a newcomer imports the other end first; it also hides which module
owns what.  The graph is read from the source with ``ast`` (nothing is imported):
module-level and function-local imports, ``import kdray.x``, ``from kdray.x import
y``, ``from kdray import x`` (x a module) and relative imports.  Imports under
``if TYPE_CHECKING:`` never run and are left out.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdray"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def run_nodes(tree: ast.AST):
    """Every node of the tree except those under ``if TYPE_CHECKING:`` (annotations only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None) if isinstance(child, ast.If) else None
            if test is not None and ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The kdray modules ``name`` imports anywhere in its file (a from-import of a name that is
    not a module counts as importing the module it comes from)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in run_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:
                sub = f"{source}.{a.name}"
                out.add(sub if sub in known else source)
    # an import of a.b.c also runs a/__init__ and a/b/__init__; those edges are the package's, not ours
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def kdray_graph() -> dict[str, set[str]]:
    """``graph()`` of kdray, read in a fresh interpreter: in a long test session CPython 3.11's
    ``ast.parse`` can fail with "AST constructor recursion depth mismatch" once earlier code left
    its recursion counter off, whatever the file parsed."""
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return {k: set(v) for k, v in json.loads(out.stdout).items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def path_in(comp: list[str], g: dict[str, set[str]]) -> str:
    """One concrete loop through the component, for the failure message."""
    members = set(comp)
    start = comp[0]
    seen = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(g[v] & members):
            if w == start:
                return " -> ".join(seen[v] + [start])
            if w not in seen:
                seen[w] = seen[v] + [w]
                todo.append(w)
    return " -> ".join(comp)


def test_the_graph_sees_every_form_of_import():
    g = kdray_graph()
    assert "kdray.registry" in g["kdray.plugins"]                  # from kdray.registry import ...
    assert "kdray.conditions" in g["kdray.spec"]                   # from kdray import conditions
    assert "kdray.checks" in g["kdray.cli"]                        # function-local import
    assert "kdray.conditions.kd" not in g["kdray.conditions"]      # importlib by name is not an edge
    assert "kdray.sweep" not in g["kdray.setup_checks"]            # under if TYPE_CHECKING:


def test_relative_imports_resolve(tmp_path, monkeypatch):
    pkg = tmp_path / "kdray"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from . import b\nfrom ..a import f\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    g = graph()
    assert g == {"kdray": set(), "kdray.a": {"kdray.sub.b"}, "kdray.sub": {"kdray.sub.b", "kdray.a"},
                 "kdray.sub.b": {"kdray.a"}}
    assert cycles(g) == [["kdray.a", "kdray.sub.b"]]


def test_the_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert path_in(["a", "b", "c"], g) == "a -> b -> c -> a"


def test_no_module_of_kdray_is_in_an_import_cycle():
    g = kdray_graph()
    found = cycles(g)
    assert not found, "import cycles:\n" + "\n".join(path_in(c, g) for c in found)


if __name__ == "__main__":    # kdray_graph(): the import graph as JSON
    print(json.dumps({k: sorted(v) for k, v in graph().items()}))
