"""The package's structure: no import circles between its modules (read with `ast`, nothing imported)."""

import ast
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.paths import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "src" / "{{ cookiecutter.package_name }}"


def module_name(path):
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "<root>"


def resolve(module, node):
    """The project modules an `import`/`from ... import` node names (late imports inside functions included)."""
    if isinstance(node, ast.Import):
        return [
            alias.name.split(".", 1)[1] for alias in node.names if alias.name.startswith(PACKAGE.name + ".")
        ]
    if node.level == 0:
        if not (node.module or "").startswith(PACKAGE.name):
            return []
        base = (node.module or "").split(".")[1:]
    else:
        is_package = (PACKAGE / Path(*module.split("."))).is_dir() if module != "<root>" else True
        here = [] if module == "<root>" else module.split(".")
        base = here if is_package else here[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        base = base + (node.module.split(".") if node.module else [])
    names = []
    for alias in node.names:  # `from . import training` names a module; `from .x import f` names x
        candidate = [*base, alias.name]
        is_module = (PACKAGE / Path(*candidate)).with_suffix(".py").is_file() or (
            PACKAGE / Path(*candidate)
        ).is_dir()
        names.append(".".join(candidate if is_module else base) or "<root>")
    return names


def import_graph():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges.update(name for name in resolve(module, node) if name != module)
        graph[module] = edges
    return graph


def find_cycle(graph):
    """One import circle as a list of modules (first == last), or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert "paths" in graph["planning"]  # `from .paths import CONFIG_DIR`
    assert "files" in graph["metric_review"]


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph, circle",
    [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]), ({"a": {"b"}, "b": set()}, None)],
)
def test_find_cycle(graph, circle):
    assert find_cycle(graph) == circle
