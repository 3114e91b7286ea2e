"""The package's import graph: no cycles, and the layers of docs/architecture.md hold.

Every ``import`` statement counts, also those inside functions: a lazy import hides a cycle from
the interpreter, not from a reader. The graph is read from the source with ``ast``; nothing is
imported.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "megatron_bloom"


def module_files(root: str) -> Dict[str, str]:
    """``{"megatron_bloom.data.xp3": path}`` for every .py under ``root`` (a package's __init__ is the package)."""
    files = {}
    for folder, _, names in os.walk(os.path.join(root, PACKAGE)):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                files[module.removesuffix(".__init__")] = path
    return files


def imported_modules(path: str, module: str, known: Set[str]) -> Set[str]:
    """The package modules that ``module`` (at ``path``) imports, resolved to the longest known name."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod.
            names.update(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names)
    resolved = set()
    for name in names:
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known and name != module:
            resolved.add(name)
    return resolved


def import_graph(root: str = REPO) -> Dict[str, Set[str]]:
    files = module_files(root)
    known = set(files)
    return {module: imported_modules(path, module, known) for module, path in files.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_resolves_relative_and_submodule_imports():
    graph = import_graph()
    assert "megatron_bloom.layers.random" in graph["megatron_bloom.layers"]  # `from .random import ...`
    assert "megatron_bloom.errors" in graph["megatron_bloom.cli"]


def test_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles in megatron_bloom/ (every import counts, also inside functions):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


# What each layer may not import (docs/architecture.md, "Layers"). The entry-point modules sit on
# top: nothing in the package imports them.
FORBIDDEN = {
    "errors": {"*"},
    "atomic": {"*"},
    "config": {"training", "checkpoint", "data", "monitoring", "generation", "evaluation", "planning", "cli", "commands"},
    "distributed": {"training", "checkpoint", "data", "monitoring", "generation", "evaluation", "planning", "cli", "commands"},
    "layers": {"models", "training", "checkpoint", "data", "monitoring", "generation", "evaluation", "planning", "cli", "commands"},
    "models": {"training", "checkpoint", "data", "monitoring", "generation", "evaluation", "planning", "cli", "commands"},
    "data": {"models", "training", "checkpoint", "monitoring", "generation", "evaluation", "planning", "cli", "commands"},
    "monitoring": {"models", "training", "checkpoint", "generation", "evaluation", "planning", "cli", "commands"},
    "checkpoint": {"training", "monitoring", "generation", "evaluation", "planning", "cli", "commands"},
    "training": {"generation", "evaluation", "planning", "cli", "commands"},
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    graph = import_graph()
    bad = []
    for module, deps in graph.items():
        if _layer(module) != layer:
            continue
        for dep in deps:
            target = _layer(dep)
            if target != layer and ("*" in FORBIDDEN[layer] or target in FORBIDDEN[layer]):
                bad.append(f"{module} imports {dep}")
    assert not bad, f"layer '{layer}' imports upwards:\n" + "\n".join(sorted(bad))
