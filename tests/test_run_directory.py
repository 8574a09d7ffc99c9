"""The run directory (issue 30): a fresh start is fresh, best weights agree with the checkpoint a resume restores,
and every file we write follows the user's umask.

The trainings run in this process (`csi_dist.train.main`, as the command line would) on a copy of the suite's
trained run, so each case costs seconds: a refused start trains nothing, a resume of the finished run trains no step.
The trainer's logging replaces pytest's caplog handler: its lines are read from stderr (capsys).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from csi_dist.core.files import atomic_write_json
from csi_dist.core.provenance import PROVENANCE_NAME
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR
from csi_dist.train import main
from csi_dist.training.checkpoint_files import latest_checkpoint, save_weights

TINY = ["--set", "model.model_arch=Tiny_CNN", "--set", "data.image_size=32", "--set", "training.batch_size=8",
        "--set", "training.num_workers=0", "--set", "logging.wandb_mode=disabled", "--set", "heatmap.enabled=false",
        "--set", "heatmap.every_epoch=false"]


def train(run_dir: Path, shards: Path, *extra: str) -> int:
    return main(["--config", "configs/demo.ini", "--run-dir", str(run_dir), "--set", f"data.shard_dir={shards}",
                 "--set", "training.n_epochs=1", *TINY, *extra])


def files_of(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256: what a user would find there."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def tensors_equal(first: Path, second: Path) -> bool:
    a, b = load_file(str(first)), load_file(str(second))
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(autouse=True)
def own_log_handlers():
    """The trainer replaces the root logger's handlers with one on this test's stderr: removed after the test, so
    no later test logs into a closed capture."""
    before = list(logging.getLogger().handlers)
    yield
    root = logging.getLogger()
    for handler in [handler for handler in root.handlers if handler not in before]:
        root.removeHandler(handler)


@pytest.fixture
def used_run(trained_run, tmp_path) -> Path:
    """A copy of the suite's finished 1-epoch run (15 optimizer steps, one validation: its best is its last)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("evaluation", "heatmaps"))
    return run_dir


def test_resume_never_on_a_used_run_directory_refuses_and_changes_nothing(used_run, phantom_shards, capsys):
    before = files_of(used_run)
    assert train(used_run, phantom_shards, "--resume", "never", "--set", "training.max_steps=4") == EXIT_CONFIG_ERROR
    logged = capsys.readouterr().err
    assert f"{used_run} already holds a run" in logged
    assert "--run-dir" in logged and "--resume fresh" in logged and "--resume auto" in logged
    assert files_of(used_run) == before  # nothing written, nothing deleted


def test_resume_fresh_moves_the_old_run_aside_whole_and_the_new_run_owns_the_directory(used_run, phantom_shards,
                                                                                     capsys):
    """The issue's case: the old run's checkpoints (step 15) outnumber a new 4-step run's, keep_last_checkpoints=2."""
    before = files_of(used_run)
    assert train(used_run, phantom_shards, "--resume", "fresh", "--set", "training.max_steps=4",
                 "--set", "callbacks.keep_last_checkpoints=2") == 0
    aside = [path for path in used_run.parent.iterdir() if path.name.startswith(f"{used_run.name}.old-")]
    assert len(aside) == 1, sorted(path.name for path in used_run.parent.iterdir())
    assert files_of(aside[0]) == before  # the old run, whole and unchanged
    assert f"moved the run in {used_run} aside to {aside[0]}" in capsys.readouterr().err

    assert sorted(path.name for path in (used_run / "checkpoints").iterdir()) == ["step-00000004"]
    history = json.loads((used_run / "training_history.json").read_text())
    assert [record["global_step"] for record in history] == [4]
    segments = json.loads((used_run / PROVENANCE_NAME).read_text())["segments"]
    assert [(segment["start_step"], segment["end_step"]) for segment in segments] == [(0, 4)]
    weights = used_run / "weights"
    assert tensors_equal(weights / "best.safetensors", weights / "last.safetensors")  # its one validation
    assert not tensors_equal(weights / "best.safetensors", aside[0] / "weights" / "best.safetensors")

    # the same command with --resume auto continues the new run, not the old one
    assert train(used_run, phantom_shards, "--set", "training.max_steps=6") == 0
    assert f"resumed from {used_run}/checkpoints/step-00000004" in capsys.readouterr().err


def test_a_requeued_slurm_job_continues_the_run_it_started_whatever_its_resume_option(tmp_path):
    """A requeue reruns the job's command line: `--resume never` or `fresh` there must not refuse or move aside the
    run this very job started (its provenance names the job)."""
    from csi_dist.training.resume_or_start import plan_start
    run_dir = tmp_path / "run"
    atomic_write_json(run_dir / PROVENANCE_NAME, {"origin": {}, "segments": [{"slurm_job_id": "4242"}]})
    for resume in ("never", "fresh"):
        assert plan_start(run_dir, resume, {"SLURM_JOB_ID": "4242"}) == ("auto", False)
    assert plan_start(run_dir, "fresh", {"SLURM_JOB_ID": "77"}) == ("never", True)  # another job: move aside
    assert plan_start(tmp_path / "unused", "never", {"SLURM_JOB_ID": "4242"}) == ("never", False)


def end_not_recorded(run_dir: Path) -> None:
    """The run's provenance as a kill after its final checkpoint, before the end of the run was recorded, leaves it."""
    provenance = json.loads((run_dir / PROVENANCE_NAME).read_text())
    provenance["segments"][-1].update(outcome="running", finished=False)
    atomic_write_json(run_dir / PROVENANCE_NAME, provenance)


def test_a_finished_run_rerun_says_it_is_complete_and_trains_and_saves_nothing(used_run, phantom_shards, capsys):
    """SLURM requeues and sweeps rerun the same command: a finished run stays finished (exit 0, nothing written), and
    says so with where its weights are and what to run next; a changed config is named key by key, not applied."""
    before = files_of(used_run)
    same = ["--config", str(used_run / "resolved_config.ini"), "--run-dir", str(used_run)]
    capsys.readouterr()
    assert main(same) == 0
    logged = capsys.readouterr().err
    assert f"the run in {used_run} is complete (all 1 epoch(s) trained, 15 optimizer steps; best val_loss " \
           in logged, logged
    assert "resumed from" not in logged and "epoch 0: val_loss" not in logged
    assert f"weights: {used_run}/weights/best.safetensors (best" in logged
    assert f"{used_run}/weights/last.safetensors (last)" in logged
    assert f"next: python -m csi_dist.evaluate --run-dir {used_run}; " \
           f"python -m csi_dist.predict --run-dir {used_run} --images DIR" in logged
    assert files_of(used_run) == before  # no new checkpoint, segment, weights or config

    assert main([*same, "--set", "optimization.learning_rate=0.01"]) == 0  # what ended it is unchanged
    logged = capsys.readouterr().err
    assert f"the run in {used_run} is complete" in logged
    assert "optimization.learning_rate 0.002 -> 0.01" in logged
    assert files_of(used_run) == before

    # more epochs: the run continues, saying so and naming what changed (one more step: max_steps 16)
    assert main([*same, "--set", "training.n_epochs=2", "--set", "training.max_steps=16",
                 "--set", "optimization.learning_rate=0.01", "--set", "training.num_workers=0"]) == 0
    logged = capsys.readouterr().err
    changed = next(line for line in logged.splitlines() if "optimization.learning_rate 0.002 -> 0.01" in line)
    assert "training.n_epochs 1 -> 2" in changed and "training.max_steps 0 -> 16" in changed, changed
    assert "config_sha256" not in logged  # the keys, not two hashes
    assert f"continuing the run in {used_run} from step 15 (epoch 1); --resume fresh starts over" in logged
    assert "training finished (completed) after 16 optimizer steps; best val_loss " in logged
    assert f"next: python -m csi_dist.evaluate --run-dir {used_run}; " in logged
    assert sorted(path.name for path in (used_run / "checkpoints").iterdir())[-1] == "step-00000016"


def test_a_run_is_finished_where_its_recorded_end_is_the_end_its_settings_ask_for(tmp_path):
    from csi_dist.training.resume_or_start import finished_because
    run_dir = tmp_path / "run"
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "weights" / "last.safetensors").touch()
    atomic_write_json(run_dir / PROVENANCE_NAME, {"segments": [{"end_step": 30, "finished": True}]})
    state = {"epoch": 2, "global_step": 30, "early_stopping": {"evaluations_without_improvement": 2}}
    assert finished_because(run_dir, state, n_epochs=2, max_steps=0, patience=0) == "all 2 epoch(s) trained"
    assert finished_because(run_dir, state, n_epochs=3, max_steps=30, patience=0) == "training.max_steps = 30 reached"
    assert finished_because(run_dir, state, n_epochs=3, max_steps=0, patience=2).startswith("early stopped")
    assert finished_because(run_dir, state, n_epochs=3, max_steps=40, patience=3) is None  # more to train
    # killed after its last checkpoint: its end never recorded (running), or its last weights never written
    atomic_write_json(run_dir / PROVENANCE_NAME, {"segments": [{"end_step": 30, "outcome": "running"}]})
    assert finished_because(run_dir, state, n_epochs=2, max_steps=0, patience=0) is None
    atomic_write_json(run_dir / PROVENANCE_NAME, {"segments": [{"end_step": 30, "finished": True}]})
    (run_dir / "weights" / "last.safetensors").unlink()
    assert finished_because(run_dir, state, n_epochs=2, max_steps=0, patience=0) is None


def test_best_weights_always_agree_with_the_checkpoint_a_resume_restores(used_run, phantom_shards):
    """A kill after an evaluation wrote weights/best.safetensors but before a checkpoint recorded it (or after the
    checkpoint, before the best was published): the resumed run's best file is the one its restored state names.
    The run has one validation, so its best weights are its last (compared with last.safetensors, not with the
    trainer's own record)."""
    weights = used_run / "weights"
    newest = latest_checkpoint(used_run)
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["early_stopping"]["best_epoch"] == 0
    planted = {key: value * 2 for key, value in load_file(str(weights / "last.safetensors")).items()}
    save_file(planted, str(weights / "best.safetensors"))  # a best no checkpoint knows of
    config = ["--config", str(used_run / "resolved_config.ini"), "--run-dir", str(used_run), *TINY]
    end_not_recorded(used_run)  # killed before the run's end was recorded: the rerun resumes and finishes it
    assert main(config) == 0  # resumes the run at its last step: no step, the final save again
    assert tensors_equal(weights / "best.safetensors", weights / "last.safetensors")

    (weights / "best.safetensors").unlink()  # killed between the checkpoint's rename and the best's publication
    end_not_recorded(used_run)
    assert main(config) == 0
    assert tensors_equal(weights / "best.safetensors", weights / "last.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_written_atomically_follows_the_umask(trained_run, tmp_path, umask):
    """safetensors creates its files 0600: a colleague could not load the weights of a shared run folder."""
    from csi_dist.core.config import load_config, save_config
    from csi_dist.convert import main as convert
    expected = 0o666 & ~umask
    previous = os.umask(umask)
    try:
        save_weights({"w": torch.ones(2)}, tmp_path / "weights.safetensors")
        atomic_write_json(tmp_path / "history.json", [1.0])
        save_config(load_config(None), tmp_path / "resolved_config.ini")
        assert convert([str(latest_checkpoint(trained_run)), str(tmp_path / "model.safetensors")]) == 0
    finally:
        os.umask(previous)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in
             ("weights.safetensors", "history.json", "resolved_config.ini", "model.safetensors")}
    assert modes == dict.fromkeys(modes, expected), {name: oct(mode) for name, mode in modes.items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_move_the_old_run_aside_once_and_train_the_new_one(used_run, phantom_shards, tmp_path):
    """Rank 0 alone renames the directory, between barriers: rank 1 neither refuses the half-moved directory nor
    trains into the old run."""
    from test_parity import train_runs
    before = files_of(used_run)
    settings = [f"data.shard_dir={phantom_shards}", "model.model_arch=Tiny_CNN", "data.image_size=32",
                "training.batch_size=4", "training.num_workers=0", "logging.wandb_mode=disabled",
                "heatmap.enabled=false", "heatmap.every_epoch=false", "training.max_steps=2"]
    statuses = train_runs(2, tmp_path, settings, {used_run.name: ""},
                          common=["--config", "configs/demo.ini", "--resume", "fresh"])
    assert statuses == {used_run.name: 0}
    aside = [path for path in tmp_path.iterdir() if path.name.startswith(f"{used_run.name}.old-")]
    assert len(aside) == 1 and files_of(aside[0]) == before
    assert sorted(path.name for path in (used_run / "checkpoints").iterdir()) == ["step-00000002"]
    assert sorted(path.name for path in (used_run / "checkpoints" / "step-00000002").glob("rng_rank*")) == [
        "rng_rank00000.pt", "rng_rank00001.pt"]
