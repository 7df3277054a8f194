"""The import layering of the library (README "Layout"): read from the source with ``ast``.

A module may import from its own unit and from the layers below it, never from a layer above
or from another unit of its own layer (``retrieval`` never imports ``tasks``; ``tasks.cir`` never
imports ``tasks.classify``), and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mora_retrieval"

#: Bottom to top. A unit is a top-level module or package of mora_retrieval, a part of tasks, or
#: model.heads (which sits above the adapters).
LAYERS = (
    ("errors",),
    ("", "fileio", "device", "progress"),  # "": the package itself (its version)
    ("data", "report"),
    ("model",),
    ("adapters", "engine"),
    ("runs", "model.heads"),  # the classifier switches prompt adapters per missing case
    ("tasks", "tasks.settings"),
    ("tasks.cir", "tasks.classify", "tasks.pretrain", "retrieval"),
    ("analysis",),
    ("demo",),
)
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def unit_of(module: str) -> str:
    parts = module.split(".") if module else []
    if (parts[:1] == ["tasks"] and len(parts) > 1) or module == "model.heads":
        return ".".join(parts[:2])
    return parts[0] if parts else ""


def imports_of(module: str) -> set[str]:
    """The library modules ``module`` imports (relative and absolute ``mora_retrieval`` imports)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "mora_retrieval"]
            found.update(n.partition(".")[2] for n in names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "mora_retrieval":
                target = node.module.partition(".")[2]
            else:
                continue
            submodules = {f"{target}.{a.name}".lstrip(".") for a in node.names} & set(MODULES)
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined by the module itself
                found.add(target)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_unit_has_a_layer():
    assert {unit_of(m) for m in MODULES} <= set(LAYER_OF), {unit_of(m) for m in MODULES} - set(LAYER_OF)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    unit = unit_of(module)
    wrong = [target for target in GRAPH[module] if unit_of(target) != unit
             and LAYER_OF[unit_of(target)] >= LAYER_OF[unit]]
    assert not wrong, f"{module} (layer {LAYER_OF[unit]}) imports {wrong}"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [])


def test_the_reader_resolves_relative_and_package_imports():
    assert {"model.combiner", "runs", "adapters", "device"} <= GRAPH["retrieval.encoder"]
    assert "engine.checkpoint" in GRAPH["engine.trainer"]  # from . import checkpoint as ckpt
    assert "tasks.settings" in GRAPH["tasks.cir.settings"]  # from ..settings import ...
    assert {"tasks.cir", "tasks.classify", "retrieval.search"} <= GRAPH["demo"]
