"""Arrows point one way: every import goes down an ordered list of layers.

The project is a stack. Each layer may import the layers below it and its own package, never a layer
above it, and two packages of one layer never import each other. Every module is read with ``ast``,
so imports inside functions count too; and a function-level project import is allowed only where it
keeps a heavy optional dependency out of the import of its module (listed below with the reason).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_TOPS = ("reconstruct", "pruners", "calib", "cli")

# Lowest first. A "part" is a top-level package (pruners, calib), a sub-package of reconstruct
# (reconstruct.loop) or a top-level module of reconstruct (reconstruct.runtime).
LAYERS = (
    ("pruners", "calib", "reconstruct"),  # mask makers, calibration data; reconstruct/__init__: the version
    ("reconstruct.runtime", "reconstruct.faults", "reconstruct.flags"),  # devices, dtypes; crash points; flag fields
    ("reconstruct.atomic",),  # atomic file writes
    ("reconstruct.parallel",),  # torchrun ranks
    ("reconstruct.progress", "reconstruct.host_allocator"),
    ("reconstruct.config",),  # the job's specs
    ("reconstruct.modelio",),  # model folders: read, write, facts about a model
    ("reconstruct.state",),  # job folders: lock, manifest, fingerprint, resume records
    ("reconstruct.methods",),  # repair methods of one block
    ("reconstruct.planner", "reconstruct.evaluation"),
    ("reconstruct.loop", "reconstruct.retrain", "reconstruct.shrink"),  # the block loop, retraining, shrinking
    ("reconstruct.reporting",),  # reports and status, rendered from what jobs recorded
    ("reconstruct.jobs",),  # the job drivers
    ("reconstruct.cli",),  # the command line: options derived from the specs' flags, one module per command
    ("cli",),  # the entry point the design card names (cli:app)
    ("reconstruct.__main__",),  # python -m reconstruct
)
RANK = {part: rank for rank, layer in enumerate(LAYERS) for part in layer}

# (module file, imported module) → why the import waits for the call.
DEFERRED = {
    ("reconstruct/evaluation/tasks.py", "reconstruct.evaluation.lm_eval_model"):
        "lm_eval is an optional dependency (the eval extra); only --eval-tasks needs it",
}


def part_of(module: str) -> str:
    """The layer part a dotted module name belongs to."""
    names = module.split(".")
    if names[0] == "reconstruct" and len(names) > 1:
        return f"reconstruct.{names[1]}"
    return names[0]


def module_name(path: Path) -> str:
    """Dotted module name of a file under the repository root."""
    names = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def project_imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, inside_a_function)`` for every project module ``path`` imports (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(function)}
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            names = [".".join(base + ([node.module] if node.module else []))]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        found += [(name, id(node) in in_function) for name in names if name.split(".")[0] in PROJECT_TOPS]
    return found


def project_files() -> list[str]:
    """Every module of the project, relative to the repository root."""
    files = [ROOT / "cli.py"] if (ROOT / "cli.py").is_file() else []
    for top in ("reconstruct", "pruners", "calib", "cli"):
        if (ROOT / top).is_dir():
            files += sorted((ROOT / top).rglob("*.py"))
    return [path.relative_to(ROOT).as_posix() for path in files]


def test_the_scan_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    package = tmp_path / "reconstruct" / "loop"
    package.mkdir(parents=True)
    module = package / "m.py"
    module.write_text("import os\nfrom . import hooks\n\ndef f():\n    from reconstruct.progress import progress_bar\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert project_imports(module) == [("reconstruct.loop", False), ("reconstruct.progress", True)]


def test_every_part_has_a_layer():
    parts = {part_of(module_name(ROOT / name)) for name in project_files()}
    missing = sorted(parts - set(RANK))
    assert not missing, f"{missing}: add each to LAYERS in tests/test_arrows.py, at the layer it belongs to"


@pytest.mark.parametrize("name", project_files())
def test_imports_point_down(name):
    importer = part_of(module_name(ROOT / name))
    upward = [module for module, _ in project_imports(ROOT / name)
              if part_of(module) != importer and RANK.get(part_of(module), 0) >= RANK.get(importer, 0)]
    assert not upward, (
        f"{name} ({importer}, layer {RANK.get(importer)}) imports {upward} from its own layer or above: "
        "move the shared code down, or pass what it needs in from the caller"
    )


@pytest.mark.parametrize("name", project_files())
def test_project_imports_sit_at_the_top_of_the_module(name):
    deferred = [module for module, inside in project_imports(ROOT / name) if inside and (name, module) not in DEFERRED]
    assert not deferred, (
        f"{name} imports {deferred} inside a function: import at the top (an import cycle means the "
        "layers are wrong); only a heavy optional dependency may wait, listed in DEFERRED with its reason"
    )
