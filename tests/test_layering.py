"""The layering the README's Contents promises, read from the source: every import counts (module level, inside a
function, under TYPE_CHECKING), no module imports itself back through others, the leaves and the engine know
nothing of the lab, and the lab's stages import only the stages above them."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lora", "model", "data", "training", "experiments", "bench")
LEAVES = ("lora", "model", "data")
# The lab's stages in the README's order: each may import the ones before it, never one after it.
STAGES = ("config", "base", "finetune", "sweep", "report", "run")


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (a package is its __init__)."""
    found = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports anywhere in its file (relative imports resolved)."""
    mods = modules(root, packages)

    def known(name: str) -> str | None:  # the module a dotted name lives in: `a.b.C` -> `a.b`
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod
                targets.update(known(f"{base}.{alias.name}") or known(base) for alias in node.names)
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def stage_of(module: str) -> str:
    """`experiments.sweep.plan` -> `sweep`; `experiments.run` -> `run`."""
    return module.split(".")[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    g = import_graph(REPO, PACKAGES)
    # the reader resolves what it must: a relative import, a function-level one, a package's submodule
    assert "lora.config" in g["lora.layer"]  # `from .config import LoRAConfig`
    assert "training.distributed" in g["experiments.run"]  # imported inside _join_torchrun
    assert "experiments.sweep.plan" in g["experiments.run"]
    return g


def test_the_reader_finds_a_cycle_through_a_function_body_and_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    g = import_graph(tmp_path, ("pkg",))
    assert g == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(g).prepare()


def test_no_import_cycle_of_any_kind(graph):
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_the_leaves_and_the_engine_import_nothing_of_the_lab_or_the_benchmarks(graph):
    for module, targets in graph.items():
        top = module.split(".")[0]
        if top in LEAVES:
            assert {t.split(".")[0] for t in targets} <= set(LEAVES), module
        if top == "training":
            assert {t.split(".")[0] for t in targets} <= {*LEAVES, "training"}, module


def test_each_stage_of_the_lab_imports_only_the_stages_above_it(graph):
    for module, targets in graph.items():
        if not module.startswith("experiments."):
            continue
        rank = STAGES.index(stage_of(module))
        for target in targets:
            assert not target.startswith("bench"), f"{module} imports {target}"
            if target.startswith("experiments."):
                assert STAGES.index(stage_of(target)) <= rank, f"{module} imports {target}, a later stage"
