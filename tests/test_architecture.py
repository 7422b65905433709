"""The package's layers: imports run one way, downward, and no module imports itself back round a cycle.

Every import counts, wherever it stands: at the top, inside a function (loaded late), or under
`TYPE_CHECKING`. docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"

LAYERS: list[tuple[str, ...]] = [
    ("gateway", "gateway.errors", "gateway.schema", "gateway.display"),
    ("gateway.config",),
    ("gateway.store",),
    ("gateway.catalog",),
    ("gateway.calls",),
    ("gateway.policy",),
    ("gateway.audit",),
    ("gateway.wire", "gateway.principals"),
    ("gateway.upstream",),
    ("gateway.core",),
    ("gateway.downstream", "gateway.console"),
    ("gateway.setup",),
    ("gateway.cli",),
    ("gateway.launch", "gateway.__main__"),
]
"""Lowest first: a module may import from its own layer's modules and from layers below it."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(GATEWAY.rglob("*.py"))}


def _layer(module: str) -> int:
    """The layer of `module`: that of the longest entry it is, or lies within."""
    best, found = -1, None
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best:
                best, found = len(entry), index
    if found is None or (found == 0 and module not in LAYERS[0]):
        raise LookupError(module)
    return found


def _imports(module: str, source: str | None = None) -> set[str]:
    """Every gateway module `module` imports, anywhere in it (in `source`, when given)."""
    found: set[str] = set()
    text = MODULES[module].read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "gateway")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gateway":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found - {module}


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for module in MODULES:
        try:
            _layer(module)
        except LookupError:
            unplaced.append(module)
    assert unplaced == [], f"place these in LAYERS (and docs/architecture.md): {unplaced}"


def _upward(module: str, source: str | None = None) -> list[str]:
    return sorted(name for name in _imports(module, source) if _layer(name) > _layer(module))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph` (a module importing the package it lies in is none)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph[module]):
            if module.startswith(name + "."):
                continue
            if state.get(name) == 1:
                cycles.append([*trail[trail.index(name) :], name] if name in trail else [module, name])
            elif name not in state:
                visit(name, [*trail, name])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward(module: str) -> None:
    assert _upward(module) == [], f"{module} (layer {_layer(module)}) imports from higher layers"


def test_no_import_cycle() -> None:
    assert _cycles({module: _imports(module) & MODULES.keys() for module in MODULES}) == []


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    hidden = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gateway.core.pipeline import Stage\n"
    assert _upward("gateway.config.models", hidden) == ["gateway.core.pipeline"]
    late = "def f():\n    from gateway.cli import common\n"
    assert _upward("gateway.audit.store", late) == ["gateway.cli.common"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"p": set(), "p.m": {"p"}}) == []
