"""The layout is the architecture: packages import only the layers below them, and no module of
fp8exp imports another that (directly or not) imports it back. Every import counts, also one
inside a function (hiding an import there does not break a cycle), except under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Package -> the packages it may import. Data flows config -> data -> models -> precision -> run;
# tracking observes (it reads FP8 state, never builds data or models); report reads what tracking
# stored; serve answers requests with saved models (and ships models/pooling.py, the one fp8exp
# layer a saved model's config names); run drives everything.
LAYERS = {
    "config": set(),
    "data": {"config"},
    "models": {"config"},
    "precision": {"config"},
    "tracking": {"config", "precision"},
    "report": {"config", "tracking"},
    "serve": {"config", "data", "models", "precision", "report", "tracking"},
    "run": {"config", "data", "models", "precision", "report", "serve", "tracking"},
    # Top-level modules: start-up, the Hydra entry point and the thin command shims.
    "startup": set(),
    "__main__": {"config", "run"},
    "predict": {"serve"},
    "infer_bench": {"serve"},
    "tracking_sync": {"tracking"},
}


def module_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a submodule importing its own package's
    __init__ is Python's doing, not an edge)."""
    name = package.name
    files = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                  for n in ast.walk(node)}
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for imported in names:
                target = resolve(imported) if imported.split(".")[0] == name else None
                if target and target != module and not module.startswith(target + "."):
                    targets.add(target)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def violations(package: Path, layers: dict[str, set[str]]) -> list[str]:
    """One line per forbidden import or cycle; empty when the package keeps its layering."""
    graph = module_graph(package)
    problems = []
    for module, targets in sorted(graph.items()):
        layer = layer_of(module)
        if layer != "__init__" and layer not in layers:
            problems.append(f"{module}: package {layer!r} is not declared in the layering")
            continue
        for target in sorted(targets):
            other = layer_of(target)
            if other not in (layer, "__init__", "startup") and other not in layers.get(layer, set()):
                problems.append(f"{module} imports {target}: {layer} may not use {other}")
    problems += [f"import cycle: {' <-> '.join(group)}" for group in cycles(graph)]
    return problems


def test_fp8exp_keeps_its_layering():
    assert violations(ROOT / "fp8exp", LAYERS) == []


def test_every_package_is_declared_and_the_readme_names_it():
    packages = {p.name for p in (ROOT / "fp8exp").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS)
    readme = (ROOT / "README.md").read_text()
    architecture = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    for package in packages:
        assert f"fp8exp/{package}/" in architecture, f"the README's Architecture section does not mention {package}/"


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A tiny package with the same shape: config below run, run importing config."""
    package = tmp_path / "fp8exp"
    for folder in ("config", "run"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "config" / "checks.py").write_text("X = 1\n")
    (package / "run" / "train.py").write_text("from fp8exp.config.checks import X\n")
    return package


def test_the_check_fails_on_a_cycle_hidden_in_a_function(toy: Path):
    layers = {"config": {"run"}, "run": {"config"}}  # allowed both ways: only the cycle is wrong
    assert violations(toy, layers) == []
    (toy / "config" / "checks.py").write_text("X = 1\n\ndef f():\n    from fp8exp.run import train\n")
    assert violations(toy, layers) == ["import cycle: fp8exp.config.checks <-> fp8exp.run.train"]


def test_the_check_fails_on_an_import_against_the_layering(toy: Path):
    (toy / "config" / "checks.py").write_text("from fp8exp.run.train import Y\n")
    problems = violations(toy, {"config": set(), "run": {"config"}})
    assert "fp8exp.config.checks imports fp8exp.run.train: config may not use run" in problems
    assert "import cycle: fp8exp.config.checks <-> fp8exp.run.train" in problems


def test_type_checking_imports_do_not_count(toy: Path):
    (toy / "config" / "checks.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fp8exp.run.train import Y\n")
    assert violations(toy, {"config": set(), "run": {"config"}}) == []


def test_the_fp8_recipes_stand_alone():
    """precision/recipes/ imports nothing of fp8exp outside itself: saved models can ship it."""
    graph = module_graph(ROOT / "fp8exp")
    inside = "fp8exp.precision.recipes"
    recipes = {module for module in graph if module == inside or module.startswith(inside + ".")}
    assert recipes
    outside = {f"{module} imports {target}" for module in recipes for target in graph[module]
               if target not in recipes and target != "fp8exp.precision"}
    assert not outside, sorted(outside)
