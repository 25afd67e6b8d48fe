"""The package's imports flow one way: no cycle among fedlatent modules, function-level imports included."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fedlatent": ROOT / "fedlatent", "fedlatent.cli": ROOT / "cli"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for p in folder.rglob("*.py"):
            rel = p.relative_to(folder).with_suffix("")
            parts = [pkg] + [x for x in rel.parts if x != "__init__"]
            name = ".".join(parts)
            mods[name] = p
    return mods


def _resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = mod.split(".")
    base = base[: len(base) - level + (1 if is_pkg else 0)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the fedlatent modules it imports (anywhere in its body: module level or in a function).

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. The implicit
    import of a module's parent packages is not an edge (a package's ``__init__`` importing its own submodules
    is the usual re-export, not a cycle of code)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    names.append(sub if sub in mods else base)
            for n in names:
                while n and n not in mods and "." in n:
                    n = n.rsplit(".", 1)[0]
                if n in mods and n != mod:
                    graph[mod].add(n)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_relative_imports():
    g = import_graph()
    assert "fedlatent.fl.base" in g["fedlatent.fl.simulation"]           # module level, relative
    assert "fedlatent.generators.train" in g["fedlatent.apps.distill"]    # inside a function


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
