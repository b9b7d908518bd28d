"""The package's layout: no import cycles, between modules or between its folders."""
import ast
import importlib
import pathlib

import pytest

import randsac_fast

PKG = pathlib.Path(randsac_fast.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str, modules) -> set[str]:
    """Every randsac_fast module a file imports, function-local imports included.

    ``from pkg import sub`` imports the submodule ``pkg.sub`` (and not pkg's other contents); a name
    that is not a submodule imports ``pkg`` itself.
    """
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("randsac_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = ".".join(base[: len(base) - node.level + 1])
                mod = f"{root}.{node.module}" if node.module else root
            else:
                mod = node.module or ""
            if not mod.startswith("randsac_fast"):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in modules else mod)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {d for d in _imports(p, m, files) if d in files and d != m} for m, p in files.items()}


def _find_cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _unit(module: str) -> str:
    """The folder a module belongs to (randsac_fast.eval.knn -> eval), or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def test_no_module_import_cycles():
    assert _find_cycle(_graph()) is None


def test_no_cycles_between_folders():
    graph: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        if mod == "randsac_fast":           # the package's face imports whatever it exposes
            continue
        graph.setdefault(_unit(mod), set()).update(_unit(d) for d in deps if _unit(d) != _unit(mod))
    graph.pop("<root>", None)
    assert _find_cycle(graph) is None


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("name", ["config", "data", "eval", "interop", "models", "runtime", "train", "viz"])
def test_public_modules_are_attributes_of_the_package(name):
    module = getattr(randsac_fast, name)
    assert module is importlib.import_module(f"randsac_fast.{name}")
