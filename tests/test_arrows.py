"""Arrows point one way: ``pruners/`` and ``calib/`` import nothing from ``reconstruct/``.

The engine (``reconstruct/``) uses the mask makers and the calibration data; they stay usable, and
testable, without it. Every module is read with ``ast``, so imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOWER_PACKAGES = ("pruners", "calib")


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, at the top or inside a function (relative imports are in-package)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def lower_modules() -> list[str]:
    """Every module of the lower packages, as a path relative to the repository root."""
    return [path.relative_to(ROOT).as_posix() for package in LOWER_PACKAGES
            for path in sorted((ROOT / package).rglob("*.py"))]


def test_the_scan_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from reconstruct.progress import progress_bar\n")
    assert imported_modules(module) == ["os", "reconstruct.progress"]


@pytest.mark.parametrize("name", lower_modules())
def test_lower_packages_import_nothing_from_reconstruct(name):
    found = [module for module in imported_modules(ROOT / name) if module.split(".")[0] == "reconstruct"]
    assert not found, f"{name} imports {found}: pass what it needs in from the caller in reconstruct/ instead"
