"""The import rules of the design card, checked on the source: one direction, no cycles.

``peer -> optimizers -> collectives -> protos``: a package imports only itself and the packages to its right;
inside ``peer/``, ``peer.cli`` imports the rest and nothing imports it; and no module imports, even lazily
inside a function, a module that imports it back (directly or through others). One rule inside
``collectives/``: only the codec modules import the codecs' base (``collectives.codecs.base``); the rest import
the facade, ``collectives.codecs``. And the sub-packages of ``collectives/`` (``net``, ``codecs``, ``reduce``, ...)
import one way: no two import each other, even through others (a top-level module of ``collectives/`` is a part of
its own here).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("protos", "collectives", "optimizers", "peer")


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the four packages."""
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = project_modules()


def imports_of(name: str, path: Path) -> set[str]:
    """The project modules a module imports anywhere in its body (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import mod" imports the module pkg.mod when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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


def test_the_packages_and_their_modules_are_found():
    assert {"protos.collective_pb2", "collectives.elastic", "optimizers.registry", "peer.cli"} <= set(MODULES)


@pytest.mark.parametrize("package", LAYERS)
def test_imports_point_only_the_one_way(package):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[0] == package
        for target in targets
        if layer(target) > layer(module)
    )
    assert wrong == [], "peer -> optimizers -> collectives -> protos"


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_nothing_imports_the_cli():
    assert sorted(m for m, targets in GRAPH.items() if "peer.cli" in targets) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_codec_modules_import_the_codec_base():
    # The base's registry holds the built-ins only once collectives.codecs (the facade) has registered them, and
    # make_codec is the facade's: a module that imported only the base could not build a built-in codec.
    importers = sorted(m for m, targets in GRAPH.items() if "collectives.codecs.base" in targets)
    assert importers == [
        "collectives.codecs",
        "collectives.codecs.dense",
        "collectives.codecs.kernels",
        "collectives.codecs.sparse",
    ]



def collectives_part(module: str) -> str | None:
    """The part of collectives/ a module is in: its sub-package, or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "collectives" and len(parts) > 1 else None


def test_the_parts_of_collectives_import_one_way():
    graph: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        part = collectives_part(module)
        if part is not None:
            graph.setdefault(part, set()).update(
                p for p in map(collectives_part, targets) if p is not None and p != part)
    assert {"collectives.net", "collectives.codecs", "collectives.reduce", "collectives.hosts"} <= set(graph)
    assert cycles(graph) == []
