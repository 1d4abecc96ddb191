"""The import graph: siblings stay siblings, lower layers never import upper ones, and no file
imports another file's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_mixflow"

# What each folder may not import (its own layer or one above it).
FORBIDDEN = {
    "distributions": ("nn", "infer", "fitting", "io", "cli", "diagnostics"),
    "transforms": ("nn", "infer", "fitting", "io", "cli", "diagnostics"),
    "datasets": ("nn", "infer", "fitting", "io", "cli", "diagnostics"),
    "fitting": ("nn", "infer", "io", "cli", "diagnostics"),
    "nn": ("infer", "cli", "diagnostics"),
    "infer": ("nn", "io", "cli"),
}


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """``(module, name or None, line)`` of every import of ``pyro_mixflow`` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, a.name, node.lineno) for a in node.names]
    return [(m, n, line) for m, n, line in found if m.split(".")[0] == "pyro_mixflow"]


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _violations(package: Path) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        own = _module_name(path, package)
        folder = path.relative_to(package).parts[0] if path.parent != package else None
        for module, name, line in _imports(path):
            target = module.split(".")
            where = f"{path.relative_to(package.parent)}:{line}"
            if len(target) > 1 and target[1] in FORBIDDEN.get(folder, ()):
                problems.append(f"{where}: {folder}/ imports {module}")
            is_private = name is not None and name.startswith("_") and not name.startswith("__")
            if is_private and module != own:
                problems.append(f"{where}: private name {name} imported from {module}")
    return problems


def test_import_graph_has_no_upward_sibling_or_private_imports():
    assert _violations(PACKAGE) == []


def test_the_check_catches_an_upward_and_a_private_import(tmp_path):
    fake = tmp_path / "pyro_mixflow"
    (fake / "nn").mkdir(parents=True)
    (fake / "distributions").mkdir()
    (fake / "nn" / "gmm.py").write_text("from pyro_mixflow.infer import AutoGaussianMixture\n")
    (fake / "distributions" / "a.py").write_text("from pyro_mixflow.distributions.b import _x\n")
    problems = _violations(fake)
    assert len(problems) == 2, problems
    assert "nn/ imports pyro_mixflow.infer" in problems[1 if "distributions" in problems[0] else 0]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_each_layer_exists(folder):
    assert (PACKAGE / folder).is_dir()
