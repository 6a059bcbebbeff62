"""The repository's layout holds: the roles show in the file list, no two
modules import each other (however far round), only the entry point
reaches into the HTTP package, and the package docstrings and the README
name every module there is.

The import graph is read from the source with ast, function-level imports
included: an import deferred into a function still ties the two modules
together. An edge goes to the module named (`from api.web import x` is
api.web, `from . import openapi` inside api/ is api.openapi); a package's
__init__ importing its own modules is not counted as the reverse edge, since
Python runs __init__ first and that order is sound.
"""

import ast
import importlib
import os
import re

import pytest

from support import ROOT

HTTP_PACKAGE = "api"
ENTRY_POINT = "app"
MAX_ROOT_FILES = 8


def _packages(root):
    return sorted(d for d in os.listdir(root)
                  if os.path.isfile(os.path.join(root, d, "__init__.py")) and d not in ("tests", "bench"))


def project_modules(root=ROOT):
    """{dotted name: path} for every module of holdfast itself (not tests,
    benchmarks or docs): the Python files at the root and the packages there."""
    modules = {}
    for name in os.listdir(root):
        if name.endswith(".py"):
            modules[name[:-3]] = os.path.join(root, name)
    for package in _packages(root):
        folder = os.path.join(root, package)
        for name in os.listdir(folder):
            if name.endswith(".py"):
                dotted = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                modules[dotted] = os.path.join(folder, name)
    return modules


def import_graph(modules):
    """{module: {project modules it imports}}, from the source."""
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        is_package = path.endswith("__init__.py")
        here = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        edges = set()
        for target in targets:
            # `import store.schema` names store.schema; `import peewee` names nothing of ours.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One cycle as a list [a, b, ..., a], or None."""
    state = {}      # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


MODULES = project_modules()
GRAPH = import_graph(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_and_says_what_it_holds(name):
    module = importlib.import_module(name)
    assert (module.__doc__ or "").strip(), f"{MODULES[name]}: open with a docstring saying what it holds"


def test_no_two_modules_import_each_other():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_reads_imports_inside_functions_and_finds_cycles():
    assert "worker" in GRAPH["recover"], "recover() imports worker inside the function"
    assert find_cycle({"recover": GRAPH["recover"], "worker": {"recover"}}) == ["recover", "worker", "recover"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_the_entry_point_imports_the_http_package():
    outside = {name: sorted(t for t in targets if t == HTTP_PACKAGE or t.startswith(HTTP_PACKAGE + "."))
               for name, targets in GRAPH.items()
               if name != ENTRY_POINT and name != HTTP_PACKAGE and not name.startswith(HTTP_PACKAGE + ".")}
    offenders = {name: targets for name, targets in outside.items() if targets}
    assert not offenders, f"only {ENTRY_POINT}.py may import the HTTP package: {offenders}"
    assert HTTP_PACKAGE in GRAPH[ENTRY_POINT]


def test_the_root_shows_the_roles_at_a_glance():
    files = sorted(name for name in MODULES if "." not in name and name not in _packages(ROOT))
    assert len(files) <= MAX_ROOT_FILES, f"{len(files)} Python files at the root: {files}"
    for role in (HTTP_PACKAGE, "store", "providers", "worker", ENTRY_POINT, "recover", "config"):
        assert role in MODULES, role


@pytest.mark.parametrize("package", _packages(ROOT))
def test_each_package_says_what_is_inside(package):
    doc = importlib.import_module(package).__doc__ or ""
    inside = sorted(n for n in os.listdir(os.path.join(ROOT, package)) if n.endswith(".py") and n != "__init__.py")
    unnamed = [n for n in inside if not re.search(rf"(?<![\w.]){re.escape(n)}\b", doc)]
    assert not unnamed, f"{package}/__init__.py's docstring does not name {unnamed}"


def test_the_readme_layout_names_every_module_and_package():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    layout = re.search(r"## Layout\n+```\n(.*?)\n```", text, re.S).group(1)
    listed = {line.split()[0] for line in layout.splitlines() if line and not line[0].isspace()}
    wanted = {n + ".py" for n in MODULES if "." not in n and n not in _packages(ROOT)}
    wanted |= {p + "/" for p in _packages(ROOT)}
    assert wanted <= listed, f"README's Layout misses {sorted(wanted - listed)}"
    stale = {e for e in listed if e.endswith(".py") or e.rstrip("/") in ("api", "store", "providers")} - wanted
    assert not stale, f"README's Layout names what is gone: {sorted(stale)}"
