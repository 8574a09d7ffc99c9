"""The trainer, run for real: outputs, exact mid-epoch resume, compile cache, evaluation, bad configs."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO_ROOT, subprocess_env, torchrun_command
from csi_dist.cluster.preemption import REQUEST_FILE_NAME
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.train import main as train_main
from wandb_reader import history_rows

SMALL = ["--set", "model.model_arch=Tiny_CNN", "--set", "training.batch_size=8", "--set", "data.image_size=32",
         "--set", "training.num_workers=2",
         "--set", "callbacks.keep_last_checkpoints=100", "--set", "training.log_every_steps=5"]


def run_train(shards: Path, run_dir: Path, *extra: str, nproc: int = 1, check: bool = True,
              config: str = "configs/demo.ini") -> subprocess.CompletedProcess:
    args = ["-m", "csi_dist.train", "--config", config, "--run-dir", str(run_dir),
            "--set", f"data.shard_dir={shards}", *SMALL, *extra]
    command = torchrun_command(nproc, *args) if nproc > 1 else [sys.executable, *args]
    result = subprocess.run(command, env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def class_prior_loss(shards: Path, unknown_weight: float = 0.3) -> float:
    """The val loss of a model that knows only each zone's grade frequencies in train (the manifest's histograms):
    the chance level a trained model must beat, computed without the code under test."""
    splits = json.loads((shards / "manifest.json").read_text())["splits"]
    weights = [1.0, 1.0, 1.0, 1.0, unknown_weight]
    total = weight_sum = 0.0
    for zone, val_counts in splits["val"]["label_histogram"].items():
        train_counts = splits["train"]["label_histogram"][zone]
        prior = [(count + 0.5) / (sum(train_counts) + 2.5) for count in train_counts]
        total += sum(w * n * -math.log(p) for w, n, p in zip(weights, val_counts, prior))
        weight_sum += sum(w * n for w, n in zip(weights, val_counts))
    return total / weight_sum


def tensors_equal(first: Path, second: Path) -> bool:
    a, b = load_file(str(first)), load_file(str(second))
    return a.keys() == b.keys() and all((a[key] == b[key]).all() for key in a)


@pytest.mark.slow
def test_training_writes_outputs_and_resumes_mid_epoch_bit_identically(phantom_shards: Path, tmp_path: Path):
    """With data.gpu_augment=true: the images are finished where the batch is moved (here the CPU), from the same
    per-sample draws; the other trainer tests finish them in the loader workers."""
    full = tmp_path / "full"
    # Custom_1, not the suite's Tiny_CNN: in 2 epochs at 32 px only the seed's width learns past the priors
    on_device = ("--set", "data.gpu_augment=true", "--set", "model.model_arch=Custom_1")
    run_train(phantom_shards, full, "--set", "training.n_epochs=2", "--set", "callbacks.checkpoint_every_steps=5",
              *on_device)
    train_count = json.loads((phantom_shards / "manifest.json").read_text())["splits"]["train"]["count"]
    steps = -(-train_count // 8)
    assert (full / "resolved_config.ini").is_file()
    history = json.loads((full / "training_history.json").read_text())
    assert [record["epoch"] for record in history] == [0, 1]
    assert history[-1]["val_loss"] < class_prior_loss(phantom_shards), history  # it learned more than the priors
    checkpoints = sorted(p.name for p in (full / "checkpoints").iterdir())
    # every 5 optimizer steps inside an epoch, plus each epoch end
    expected = sorted({*range(5, 2 * steps, 5), steps, 2 * steps})
    assert checkpoints == [f"step-{step:08d}" for step in expected]

    # TensorBoard and W&B (offline) files hold the logged values
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(full / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("val/f1_weighted")] == [steps, 2 * steps]
    assert events.Scalars("val/f1_weighted")[-1].value == pytest.approx(history[-1]["val_f1_weighted"], rel=1e-6)
    run_file = next((full / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = [row["val/f1_weighted"] for row in history_rows(run_file) if "val/f1_weighted" in row]
    assert logged == pytest.approx([record["val_f1_weighted"] for record in history])

    # a copy cut back to the first periodic checkpoint inside epoch 1 resumes to the same final weights
    mid_epoch = next(step for step in expected if steps < step < 2 * steps and step % steps)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("wandb", "tensorboard"))
    for step in expected:
        if step > mid_epoch:
            shutil.rmtree(resumed / "checkpoints" / f"step-{step:08d}")
    shutil.rmtree(resumed / "weights")
    result = run_train(phantom_shards, resumed, "--set", "training.n_epochs=2",
                       "--set", "callbacks.checkpoint_every_steps=5", *on_device)
    assert f"resumed from {resumed}/checkpoints/step-{mid_epoch:08d}" in result.stderr
    assert tensors_equal(full / "weights" / "last.safetensors", resumed / "weights" / "last.safetensors")
    assert json.loads((resumed / "training_history.json").read_text()) == history


@pytest.mark.slow
def test_evaluate_writes_the_report_for_every_test_image(phantom_shards: Path, trained_run: Path, tmp_path: Path):
    run_dir = trained_run  # trained, and evaluated on the test split, by the fixture
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    predictions = (run_dir / "evaluation" / "test_predictions.csv").read_text().splitlines()
    assert len(predictions) - 1 == manifest["splits"]["test"]["count"]
    metrics = json.loads((run_dir / "evaluation" / "test_metrics.json").read_text())
    assert metrics["n_images"] == manifest["splits"]["test"]["count"]
    assert (run_dir / "evaluation" / "test_report.md").is_file()

    # a notice (here the request file train.sbatch's trap writes) stops the evaluation with 75 and no partial report
    (run_dir / REQUEST_FILE_NAME).touch()
    stopped = subprocess.run([sys.executable, "-m", "csi_dist.evaluate", "--run-dir", str(run_dir), "--splits", "test",
                              "--out", str(tmp_path / "stopped")], env=subprocess_env(CSI_REQUEUE="0"), cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    assert "evaluation stopped by a preemption notice" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not (tmp_path / "stopped" / "test_report.md").exists()
    assert not (run_dir / REQUEST_FILE_NAME).exists()  # handled, so the rerun evaluates


def compiled_graphs(cache: Path) -> set[str]:
    """The FX graphs and compiled autograd graphs inductor has stored under a TORCHINDUCTOR_CACHE_DIR."""
    return {str(path.relative_to(cache)) for kind in ("fxgraph", "aotautograd") for path in (cache / kind).rglob("*")
            if path.is_file()}


@pytest.mark.slow
def test_a_resumed_compiled_run_compiles_nothing_again(phantom_shards: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # inductor's default would be /tmp on the node
    run_dir = tmp_path / "compiled"
    compiled = ["--set", "model.compile=true", "--set", "training.n_epochs=1",
                "--set", "logging.wandb_mode=disabled"]
    run_train(phantom_shards, run_dir, *compiled, "--set", "training.max_steps=2")
    first = compiled_graphs(run_dir / "compile_cache")
    assert any(name.startswith("fxgraph/") for name in first), "nothing was compiled into the run directory"

    resumed = run_train(phantom_shards, run_dir, *compiled, "--set", "training.max_steps=4")
    assert "resumed from" in resumed.stderr and "epoch 0: val_loss" in resumed.stderr
    assert compiled_graphs(run_dir / "compile_cache") == first  # every graph came from the run's cache


def test_bad_config_exits_2_naming_the_key(tmp_path: Path, caplog):
    bad = tmp_path / "bad.ini"
    bad.write_text("[Training]\nbatch_sise = 8\n")
    assert train_main(["--config", str(bad)]) == 2  # the command line's main, in this process
    assert "bad.ini [Training] batch_sise: unknown key 'batch_sise'; did you mean 'training.batch_size'" in caplog.text


def test_missing_shards_exit_2_with_the_fix(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "csi_dist.train", "--config", "configs/demo.ini",
                             "--set", f"data.shard_dir={tmp_path}", "--debug"], env=subprocess_env(),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "csi-shards --demo" in result.stderr
