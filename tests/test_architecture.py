"""The package's layering (docs/architecture.md), checked by parsing every import — lazy ones included.

A module may import its own layer and the layers below it, never one above; modules form no import cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastsam3d_cli"

# Lowest first. A top-level module is its own layer; a subpackage is one layer.
LAYERS = ["errors", "device", "imaging", "model", "weights", "data", "interactive", "training", "benchmark",
          "serve", "cli", "__main__"]
# The package root only re-exports (lazily, by name) and may name any layer.
ROOT_MODULE = "fastsam3d_cli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def package_imports(path: Path) -> set[str]:
    """Every fastsam3d_cli module that `path` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(ROOT_MODULE))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = me.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(ROOT_MODULE):
                continue
            found.add(target)
            for alias in node.names:  # `from fastsam3d_cli.x import module`
                candidate = f"{target}.{alias.name}"
                if _exists(candidate):
                    found.add(candidate)
    found.discard(me)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_known_layer():
    unknown = sorted({layer_of(m) for m in all_modules() if m != ROOT_MODULE} - set(LAYERS))
    assert not unknown, f"add these to LAYERS (and docs/architecture.md): {unknown}"


def test_no_module_imports_a_higher_layer():
    violations = []
    for module, path in all_modules().items():
        if module == ROOT_MODULE:
            continue
        mine = LAYERS.index(layer_of(module))
        for target in package_imports(path):
            if target == ROOT_MODULE:  # `from fastsam3d_cli import __version__`
                continue
            if LAYERS.index(layer_of(target)) > mine:
                violations.append(f"{module} imports {target}")
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_modules_form_no_import_cycle():
    graph = {m: {t for t in package_imports(p) if t in all_modules() and t != ROOT_MODULE}
             for m, p in all_modules().items()}
    # a package's __init__ is reached through its submodules' imports; drop edges into bare packages
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " → ".join(cycle))


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The parser is what the two tests above rely on: it must see imports inside functions and relative ones."""
    fake = PACKAGE / "model" / "common.py"  # has `from .gemm import linear`
    assert "fastsam3d_cli.model.gemm" in package_imports(fake)
    predictor = PACKAGE / "interactive" / "predictor.py"  # imports model.cpu_runtime inside a method
    assert "fastsam3d_cli.model.cpu_runtime" in package_imports(predictor)
