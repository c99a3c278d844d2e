"""The package's import graph has no cycles: every `import` / `from ... import` inside dflash/ (at module level
and inside functions, where lazy imports hide a cycle from the interpreter but not from a reader) points from
a lower layer to nothing that imports it back. Parsed with `ast`, nothing is imported."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "dflash"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module `name` imports. `from X import y` counts X.y when that is a module,
    else X (y is a name defined in X); an import of a module outside the package is ignored."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                source = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import dflash.x.y` of a name: its deepest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search, so deep graphs cannot overflow)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_import_graph_has_no_cycles():
    graph = import_graph()
    assert "dflash.engine" in graph["dflash.cli"]  # the graph was read (cli imports the engine lazily)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between dflash modules: " + " -> ".join(cycle)


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_imports_resolve(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .errors import E\n")
    (package / "errors.py").write_text("E = 1\n")
    (package / "top.py").write_text("def f():\n    from .sub.leaf import g\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "leaf.py").write_text("import os\nfrom .. import top\nfrom ..errors import E\n")
    graph = import_graph(package)
    assert graph == {"dflash": {"dflash.errors"}, "dflash.errors": set(), "dflash.top": {"dflash.sub.leaf"},
                     "dflash.sub": set(), "dflash.sub.leaf": {"dflash.top", "dflash.errors"}}
    assert find_cycle(graph) == ["dflash.sub.leaf", "dflash.top", "dflash.sub.leaf"]


if __name__ == "__main__":  # python tests/test_import_graph.py [package dir]: print the cycle, if any
    found = find_cycle(import_graph(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
    print(" -> ".join(found) if found else "no cycle")
    sys.exit(1 if found else 0)
