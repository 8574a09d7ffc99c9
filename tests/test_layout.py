"""The package's shape (README "Architecture"): module-level imports of csi_dist modules form no circle, evaluation
and the sweep do not load the training loop, and no module grows past 500 lines. Read from the source with `ast`."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "csi_dist"
TRAINING_LOOP = {"csi_dist.train", "csi_dist.training.loop"}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_at_load(path: Path) -> set[str]:
    """The csi_dist modules a module imports when it is loaded (its top-level statements; imports inside functions
    are deliberate: they load something heavy only when it is used)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in MODULES and name != "csi_dist"}


IMPORTS = {name: imported_at_load(path) for name, path in MODULES.items()}


def loaded_with(name: str) -> set[str]:
    """Every csi_dist module loading `name` loads, itself excluded unless a circle leads back to it."""
    seen, todo = set(), list(IMPORTS[name])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(IMPORTS[module])
    return seen


def test_no_module_imports_itself_through_others():
    assert [name for name in MODULES if name in loaded_with(name)] == []


def test_evaluation_and_the_sweep_do_not_load_the_training_loop():
    users = {name: sorted(loaded_with(name) & TRAINING_LOOP) for name in MODULES
             if name.startswith(("csi_dist.evaluation", "csi_dist.sweep", "csi_dist.tuning", "csi_dist.evaluate",
                                 "csi_dist.predict"))}
    assert {name: loop for name, loop in users.items() if loop} == {}
    assert len(users) >= 10  # the walk found the modules it is about


def test_no_module_is_longer_than_500_lines():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: length for name, length in lengths.items() if length > MAX_LINES} == {}
    assert len(lengths) > 40
