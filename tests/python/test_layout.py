"""The package's shape: no module of python/shoal imports, at the top or
inside a function, a module that imports it back, directly or through
others (issue 17: the routes and the engine need a house without circles)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "python" / "shoal"


def imports(path, modules):
    """The package's modules that the module at path imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found.update(n.split(".")[0] for n in names if n and n.split(".")[0] in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("shoal."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("shoal."))
    return found & modules


def circles(graph):
    """Every import circle of graph, each once, from its smallest module."""
    out = []

    def walk(start, node, path):
        for n in sorted(graph[node]):
            if n == start:
                out.append(path + [n])
            elif n > start and n not in path:
                walk(start, n, path + [n])
    for m in sorted(graph):
        walk(m, m, [m])
    return out


def test_no_module_imports_one_that_imports_it_back():
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {m: imports(PACKAGE / f"{m}.py", modules) - {m} for m in modules}
    assert "client" in graph and "view" in graph["client"], "the reading of imports is broken"
    assert circles(graph) == []


def test_the_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []
