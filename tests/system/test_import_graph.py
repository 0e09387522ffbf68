"""The dependency rules of docs/architecture.md, read from the source (every import, also those inside
functions, where a hidden dependency would otherwise live):

- no import cycle between two files, nor between two parts (``ssl_modules.<subpackage>``, ``datamodules``,
  ``callbacks``);
- no module of ``ssl_modules`` imports ``callbacks`` (the probes depend on the library, not the reverse);
- ``datamodules`` imports nothing of ``ssl_modules`` but ``ssl_modules.contracts``;
- ``ssl_modules.contracts`` imports only torch, and ``ssl_modules.functional`` does not load Lightning;
- a module named with a leading underscore is imported only from inside its own package.

Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and are left out.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ssl_modules", "datamodules", "callbacks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imported_names(path: Path) -> Iterator[str]:
    """Every dotted name ``path`` imports (relative imports made absolute), TYPE_CHECKING blocks left out."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    nodes = [ast.parse(path.read_text())]
    while nodes:
        node = nodes.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                nodes.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                yield from (alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = ".".join(package[: len(package) - child.level + 1] + [child.module or ""]) if child.level \
                    else child.module
                yield from (f"{base.rstrip('.')}.{alias.name}" for alias in child.names)
            nodes.append(child)


def our_module(name: str) -> str | None:
    """The module of the three packages that ``name`` (a module or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def dependencies() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        targets = {our_module(imported) for imported in imported_names(path)}
        graph[name] = {target for target in targets if target and target != name}
    return graph


GRAPH = dependencies()


def part(module: str) -> str:
    """``ssl_modules.<subpackage or module>``, ``datamodules`` or ``callbacks``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "ssl_modules" and len(parts) > 1 else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def edges(source: str, target: str) -> list[tuple[str, str]]:
    return [(a, b) for a, targets in GRAPH.items() for b in sorted(targets)
            if a.startswith(source) and b.startswith(target)]


def test_the_graph_is_read():
    assert ("ssl_modules.methods.cribo", "ssl_modules.functional") in edges("ssl_modules.methods.cribo",
                                                                           "ssl_modules.functional")
    assert ("callbacks.knn", "ssl_modules.evaluation.knn") in edges("callbacks.knn", "ssl_modules.evaluation")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_files():
    assert cycles(GRAPH) == []


def test_no_import_cycle_between_parts():
    parts: dict[str, set[str]] = {}
    for source, targets in GRAPH.items():
        parts.setdefault(part(source), set()).update(part(t) for t in targets if part(t) != part(source))
    assert cycles(parts) == []


def test_no_module_of_ssl_modules_imports_callbacks():
    assert edges("ssl_modules", "callbacks") == []


def test_datamodules_import_only_the_contracts_of_ssl_modules():
    assert [(a, b) for a, b in edges("datamodules", "ssl_modules") if b != "ssl_modules.contracts"] == []


@pytest.mark.parametrize("module", sorted(name for name in MODULES if name.rpartition(".")[2].startswith("_")
                                          and not name.endswith("__init__") and name.count(".")))
def test_an_underscored_module_is_imported_only_from_its_own_package(module):
    package = module.rpartition(".")[0]
    outside = [source for source, targets in GRAPH.items() if module in targets and not source.startswith(package)]
    assert outside == []


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_functional_core_does_not_load_lightning():
    loaded = _loaded_after_import("ssl_modules.functional")
    assert not any(name.split(".")[0] in ("lightning", "pytorch_lightning") for name in loaded)


def test_the_contracts_load_only_torch():
    loaded = _loaded_after_import("ssl_modules.contracts")
    assert {name for name in loaded if name.split(".")[0] in PACKAGES} == {"ssl_modules", "ssl_modules.contracts"}
    assert not any(name.split(".")[0] in ("lightning", "timm", "torchvision") for name in loaded)


def test_importing_datamodules_loads_only_the_contracts_of_ssl_modules():
    loaded = _loaded_after_import("datamodules")
    assert {name for name in loaded if name.split(".")[0] == "ssl_modules"} == {"ssl_modules", "ssl_modules.contracts"}
