"""RunDir owns the layout of a run directory (README "Training", csi_dist/core/run_dir.py): a real run holds exactly the
files it names, and no other module of csi_dist spells a run-directory name, so the layout lives in one place."""
from __future__ import annotations

import ast
import os
import re
from datetime import datetime
from pathlib import Path

from conftest import REPO_ROOT

from csi_dist.core.run_dir import RunDir, calibration_beside, evaluation_heatmaps, evaluation_provenance

PACKAGE = REPO_ROOT / "csi_dist"
OWNER = PACKAGE / "core" / "run_dir.py"

# The names a run directory holds at its top (written here by hand, not read from RunDir: the check is independent).
FILE_NAMES = ("resolved_config.ini", "provenance.json", "training_history.json", "best.safetensors",
              "last.safetensors", "mlflow_run.json", "PREEMPT_REQUESTED", "failure_requeues", "compile_cache",
              ".calibration.json", ".old-")
# Folder names that are common words: spelled only as a path part (`run_dir / "weights"`, Path(x, "weights"), ...).
FOLDER_NAMES = ("checkpoints", "weights", "tensorboard", "wandb", "mlflow", "evaluation", "heatmaps", "external")
# Spellings that are not a run's path, each with why.
ALLOWED = {
    ("csi_dist/core/config.py", "checkpoints"): "training.output_dir's default: the parent of run directories",
    ("csi_dist/training/checkpoint_files.py", "best.safetensors"):
        "the best weights' name inside a checkpoint (its format)",
    ("csi_dist/demo.py", "checkpoints"): "the demo's default --run-dir, checkpoints/demo: under the parent of runs",
}


def files_on_disk(root: Path) -> set[str]:
    """Every file under `root`, relative, with os.walk (not RunDir)."""
    return {Path(folder, name).relative_to(root).as_posix()
            for folder, _, names in os.walk(root) for name in names}


def test_a_trained_run_holds_exactly_the_files_run_dir_names(trained_run):
    run = RunDir(trained_run)
    on_disk = files_on_disk(trained_run)
    # other tests of the session may add what a run gets later: temperatures beside the weights (evaluate on val)
    named_files = {run.resolved_config, run.provenance, run.history, run.best_weights, run.last_weights,
                   run.preempt_request, run.mlflow_run, calibration_beside(run.best_weights),
                   calibration_beside(run.last_weights)}
    named_folders = {run.checkpoints, run.tensorboard, run.heatmaps, run.evaluation, run.wandb, run.mlflow_store,
                     run.compile_cache, run.failure_requeues}
    # each file is one RunDir names, or lies in a folder it names
    unnamed = {path for path in on_disk if trained_run / path not in named_files
               and not any(Path(trained_run, path).is_relative_to(folder) for folder in named_folders)}
    assert unnamed == set()
    # and what this run (1 epoch, heatmaps every epoch, evaluated on test with 2 heatmaps, no W&B) must hold is there
    expected = {"resolved_config.ini", "provenance.json", "training_history.json", "weights/best.safetensors",
                "weights/last.safetensors"}
    assert expected <= on_disk
    assert {run.relative(path) for path in (run.resolved_config, run.provenance, run.history, run.best_weights,
                                            run.last_weights)} == expected
    assert {Path(path).parts[0] for path in on_disk} >= {"checkpoints", "tensorboard", "heatmaps", "evaluation"}
    assert any(path.startswith("checkpoints/step-") for path in on_disk)
    weights = {path for path in on_disk if path.startswith("weights/")}
    assert {"weights/best.safetensors", "weights/last.safetensors"} <= weights <= {
        "weights/best.safetensors", "weights/last.safetensors", "weights/best.calibration.json",
        "weights/last.calibration.json"}
    assert any(path.startswith("heatmaps/epoch_000/") for path in on_disk)
    assert run.relative(run.epoch_heatmaps(0)) == "heatmaps/epoch_000"
    assert any(path.startswith("evaluation/heatmaps/test/") for path in on_disk)
    assert run.relative(evaluation_heatmaps(run.evaluation, "test")) == "evaluation/heatmaps/test"
    assert run.relative(evaluation_provenance(run.evaluation)) == "evaluation/provenance.json"
    assert "evaluation/provenance.json" in on_disk and "evaluation/test_report.md" in on_disk


def test_run_dir_names_the_paths_the_readme_documents(tmp_path):
    run = RunDir(tmp_path / "run")
    spelled = {run.relative(path) for path in (
        run.resolved_config, run.provenance, run.history, run.checkpoints, run.best_weights, run.last_weights,
        run.tensorboard, run.wandb, run.mlflow_store, run.mlflow_run, run.heatmaps, run.evaluation,
        run.compile_cache, run.preempt_request, run.failure_requeues)}
    assert spelled == {"resolved_config.ini", "provenance.json", "training_history.json", "checkpoints",
                       "weights/best.safetensors", "weights/last.safetensors", "tensorboard", "wandb", "mlflow",
                       "mlflow_run.json", "heatmaps", "evaluation", "compile_cache", "PREEMPT_REQUESTED",
                       "failure_requeues"}
    assert run.relative(run.external_evaluation(tmp_path / "site_b")) == "evaluation/external/site_b"
    assert calibration_beside(run.best_weights) == tmp_path / "run" / "weights" / "best.calibration.json"
    assert run.moved_aside(datetime(2026, 12, 6, 5, 4, 3)) == tmp_path / "run.old-20261206-050403"
    assert run.moved_aside(datetime(2026, 12, 6, 5, 4, 3), 2) == tmp_path / "run.old-20261206-050403-2"
    assert run.debug.root == tmp_path / "run-debug"
    assert run.relative(run.export) == "export"


def docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def path_parts(tree: ast.AST) -> set[int]:
    """The string constants used as a part of a path: an operand of `/`, or an argument of Path(...)/joinpath."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found |= {id(side) for side in (node.left, node.right) if isinstance(side, ast.Constant)}
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name in ("Path", "joinpath", "TensorBoardTracker", "with_name"):
                found |= {id(arg) for arg in node.args if isinstance(arg, ast.Constant)}
    return found


def run_path_spellings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip, parts = docstrings(tree), path_parts(tree)
    relative = path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else path.name
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skip:
            continue
        names = [name for name in FILE_NAMES if re.search(rf"(?<![\w.]){re.escape(name)}", node.value)]
        names += [name for name in FOLDER_NAMES if id(node) in parts
                  and re.search(rf"(^|/){name}(/|$)", node.value)]
        found += [f"{relative}:{node.lineno}: {name!r}" for name in names if (relative, name) not in ALLOWED]
    return found


def test_no_module_but_run_dir_spells_a_run_directory_path():
    modules = sorted(path for path in PACKAGE.rglob("*.py") if path != OWNER)
    assert len(modules) > 40  # the walk found the package
    assert [spelling for path in modules for spelling in run_path_spellings(path)] == []


def test_the_spelling_check_finds_run_paths_and_leaves_words_alone(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text('"""A docstring may say weights/best.safetensors."""\n'
                      'a = run_dir / "weights" / "best.safetensors"\n'
                      'b = f"{run_dir}/training_history.json: no finite loss"\n'
                      'c = Path(run_dir, "tensorboard")\n'
                      'd = {"weights": 1}["weights"]\n'
                      'e = "max_failure_requeues"\n')
    assert sorted(run_path_spellings(source)) == ["sample.py:2: 'best.safetensors'", "sample.py:2: 'weights'",
                                                  "sample.py:3: 'training_history.json'", "sample.py:4: 'tensorboard'"]
    # and the owner spells each name the check looks for
    owner = {spelling.rsplit(": ", 1)[1].strip("'") for spelling in run_path_spellings(OWNER)}
    assert owner >= set(FILE_NAMES) - {"best.safetensors", "last.safetensors"}
