"""The package's shape: no import cycles, layers import only downwards, tests mirror the passes.

Every import counts, also those inside functions: a lazy import is still a dependency, and a
cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import networkx as nx
import pytest

import unit_scale_fx

PKG = Path(unit_scale_fx.__file__).parent
TESTS = Path(__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def import_graph() -> nx.DiGraph:
    """``module -> module it imports`` for every module of the package (explicit imports only)."""
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import a.b.c` of a non-module attribute: its module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    g.add_edge(name, t)
    return g


def test_the_import_graph_sees_known_edges():
    g = import_graph()
    # a negative control for the walker itself: edges that certainly exist are found
    assert g.has_edge("unit_scale_fx.passes.plan", "unit_scale_fx.record")
    assert g.has_edge("unit_scale_fx.api", "unit_scale_fx.pipeline")
    assert g.has_edge("unit_scale_fx.cli.main", "unit_scale_fx.api")  # a function-level import


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles[:10])


# The layers, lowest first. A module may import its own layer or lower ones, never a higher one.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "record", "layers", "scale", "tensor_stats", "table"),
    ("config", "lowp.formats", "lowp.simulated_attention", "rules"),
    ("passes",),
    ("capture", "pipeline", "weights", "checkpoint", "running_stats"),
    ("api", "backend"),
    ("lowp", "training", "analysis", "examples", "cli", "__main__", ""),
]


def _layer(module: str) -> int:
    rel = module.removeprefix("unit_scale_fx").lstrip(".")
    best, best_len = None, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (rel == prefix or rel.startswith(prefix + ".") or prefix == "") and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, module
    return best


def test_imports_only_go_down():
    up = [(a, b) for a, b in import_graph().edges if b.startswith("unit_scale_fx") and _layer(b) > _layer(a)]
    assert not up, "imports that go up a layer: " + ", ".join(f"{a} -> {b}" for a, b in up)


def test_rules_know_nothing_of_passes():
    g = import_graph()
    bad = [(a, b) for a, b in g.edges if a.startswith("unit_scale_fx.rules") and not b.startswith(
        ("unit_scale_fx.rules", "unit_scale_fx.errors", "unit_scale_fx.record", "unit_scale_fx.tensor_stats",
         "unit_scale_fx.layers"))
        and b.startswith("unit_scale_fx")]
    assert not bad, bad


PASS_MODULES = sorted(p.stem for p in (PKG / "passes").glob("*.py") if p.stem not in ("__init__", "base"))


@pytest.mark.parametrize("name", PASS_MODULES)
def test_every_pass_module_has_a_test_file(name):
    assert (TESTS / "passes" / f"test_{name}.py").exists(), f"tests/passes/test_{name}.py is missing"


def test_no_fixtures_in_the_package():
    names = {p.stem for p in PKG.rglob("*.py")}
    assert "families" not in names and "models" not in names
    assert os.path.exists(TESTS / "fixtures" / "families.py")
