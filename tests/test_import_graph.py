"""The house's import rules, checked on the source (AST), not by importing anything.

Every import statement counts, at module level and inside functions alike: a function-local
import is still an arrow between rooms, and still closes a cycle the first time it runs.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it is installed as (pyproject's package-dir)
FOLDERS = {"rayq": "rayq", "kernels": "rayq.kernels", "eval": "rayq.eval", "cluster": "rayq.cluster",
           "search": "rayq.search"}
# the rooms from the bottom up: a room may import its own modules and the rooms below it
ROOMS = ["rayq.kernels", "rayq", "rayq.eval", "rayq.cluster", "rayq.search"]


def _module_files() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if folder == "rayq" and parts[0] in FOLDERS.values():
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(rayq modules, top-level third-party/stdlib names) that module `name` imports anywhere."""
    internal, external = set(), set()
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [(base, [a.name for a in node.names])]
        else:
            continue
        for module, names in targets:
            if module != "rayq" and not module.startswith("rayq."):
                external.add(module.split(".")[0])
                continue
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            # `from pkg import submodule` is an arrow to the submodule; `from pkg import name` to pkg
            if len(submodules) < len(names) or not names:
                internal.add(module)
            internal.update(submodules)
    internal.discard(name)
    return internal, external


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(module: str) -> str:
    return max((r for r in ROOMS if module == r or module.startswith(r + ".")), key=len)


def _find_cycle() -> list[str]:
    """One import cycle among rayq's modules as [a, b, ..., a], or [] when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, (set(), set()))[0]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_walk_sees_every_room_and_resolves_imports():
    assert {_room(m) for m in MODULES} == set(ROOMS)
    # the walk is not vacuous: arrows it must see, module-level and function-local
    assert "rayq.checkpoint" in GRAPH["rayq.train"][0]
    assert "rayq.parallel._replicated" in GRAPH["rayq.parallel"][0]
    assert "rayq.cluster.trainer" in GRAPH["rayq.search.tuner"][0]
    assert "torch" in GRAPH["rayq.kernels.gemm"][1]
    assert all(target in MODULES for internal, _ in GRAPH.values() for target in internal), \
        sorted(t for internal, _ in GRAPH.values() for t in internal if t not in MODULES)


def test_no_import_cycles():
    assert _find_cycle() == []


def test_a_cycle_would_be_found():
    GRAPH["rayq.errors"][0].add("rayq.train")  # rayq.train imports rayq.errors (through checkpoint)
    try:
        assert _find_cycle()
    finally:
        GRAPH["rayq.errors"][0].discard("rayq.train")


def test_arrows_point_down_the_house():
    """kernels <- rayq <- eval <- cluster <- search: no room imports a room above it (kernels, the
    bottom room, is checked by the next test)."""
    wrong = sorted((m, t) for m, (internal, _) in GRAPH.items() for t in internal
                   if _room(m) != "rayq.kernels" and ROOMS.index(_room(t)) > ROOMS.index(_room(m)))
    assert wrong == []


def test_ray_stays_in_cluster_and_search():
    wrong = sorted(m for m, (_, external) in GRAPH.items()
                   if "ray" in external and _room(m) not in ("rayq.cluster", "rayq.search"))
    assert wrong == []


def test_kernels_import_torch_only():
    """The bottom room: torch and the standard library, nothing of rayq's above it."""
    # torch_xla is torch's own XLA device (the XLA int8 dot; imported only on XLA hosts); torchao is
    # a peer the int8 benchmark races when it happens to be installed, never a dependency
    allowed = set(sys.stdlib_module_names) | {"torch", "torch_xla", "__future__"}
    optional_peers = {"rayq.kernels.bench": {"torchao"}}
    wrong = sorted((m, sorted(external - allowed - optional_peers.get(m, set())), sorted(internal))
                   for m, (internal, external) in GRAPH.items() if _room(m) == "rayq.kernels"
                   and (external - allowed - optional_peers.get(m, set()) or any(_room(t) != "rayq.kernels" for t in internal)))
    assert wrong == []
