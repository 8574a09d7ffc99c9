"""Tracking: a W&B failure mid-run is survived (warned once, W&B off), TensorBoard keeps every scalar; MLflow holds
the masked config, every scalar TensorBoard holds and the run's files, in one MLflow run across requeued segments."""
from __future__ import annotations

import configparser
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT, subprocess_env
from csi_dist.cluster.preemption import REQUEST_FILE_NAME
from csi_dist.core.config import load_config
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.training.tracking import Tracker


def test_a_wandb_run_that_dies_does_not_stop_logging_to_tensorboard(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = load_config(overrides=["logging.wandb_mode=offline"])
    tracker = Tracker(Accelerator(cpu=True), tmp_path, config, run_name="dies")
    assert tracker.wandb_run is not None
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.wandb_run.finish()  # W&B is gone: every further call on the run raises UsageError

    with caplog.at_level(logging.WARNING, logger="csi_dist.training.tracking"):
        tracker.log({"train/loss": 0.5}, step=2)
        tracker.log({"train/loss": 0.25}, step=3)
        tracker.summary({"best": 0.25})
        tracker.close()

    warnings = [record.message for record in caplog.records if "W&B logging failed" in record.message]
    assert len(warnings) == 1 and "UsageError" in warnings[0]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]


SECRET = "s3cr3t-hospital-token"


def train_with_mlflow(shards: Path, run_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "csi_dist.train", "--config", "configs/demo.ini", "--run-dir", str(run_dir),
               "--set", f"data.shard_dir={shards}", "--set", "model.model_arch=Tiny_CNN", "--set", "data.image_size=32",
               "--set", "training.batch_size=8", "--set", "training.num_workers=0", "--set", "training.n_epochs=1",
               "--set", "training.log_every_steps=2", "--set", "callbacks.preemption_check_every_steps=6",
               "--set", "logging.wandb_mode=disabled", "--set", "logging.mlflow=true",
               "--set", f"logging.wandb_group=ward-{SECRET}"]
    return subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(CSI_REQUEUE="0", HOSPITAL_API_KEY=SECRET),
                          capture_output=True, text=True, timeout=300)


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_mlflow_holds(client, run_id: str, scalars: dict[str, list[tuple[int, float]]]) -> None:
    """Every TensorBoard scalar at the same steps in MLflow, and no other metric (TensorBoard keeps float32)."""
    assert set(client.get_run(run_id).data.metrics) == set(scalars)
    for key, expected in scalars.items():
        logged = sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))
        assert [step for step, _ in logged] == [step for step, _ in expected], key
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6), key


@pytest.mark.slow
def test_mlflow_holds_the_masked_config_every_scalar_and_the_run_files_and_a_requeue_continues_its_run(
        phantom_shards, tmp_path, monkeypatch):
    """Read back with MLflow's own client from the default local store; TensorBoard's reader is the reference."""
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / REQUEST_FILE_NAME).touch()  # a preemption notice: the first segment stops at step 6
    stopped = train_with_mlflow(phantom_shards, run_dir)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]

    client = MlflowClient((run_dir / "mlflow").as_uri())
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "KILLED"
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(run_dir / "resolved_config.ini")
    saved = {f"{section.lower()}.{key}": value for section in ini.sections() for key, value in ini[section].items()}
    assert run.data.params == saved
    assert run.data.params["logging.wandb_group"] == "ward-***"
    assert not any(SECRET in value for value in [*run.data.params.values(), *run.data.tags.values()])
    first = tensorboard_scalars(run_dir)
    assert max(step for step, _ in first["train/loss"]) == 6
    assert_mlflow_holds(client, run.info.run_id, first)

    resumed = train_with_mlflow(phantom_shards, run_dir)  # the requeued segment
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert [(other.info.run_id, other.info.status) for other in runs] == [(run.info.run_id, "FINISHED")]
    assert runs[0].data.tags["csi_dist.stop_reason"] == "completed"
    both = tensorboard_scalars(run_dir)
    assert len(both["train/loss"]) > len(first["train/loss"]) and "val/loss" in both
    assert_mlflow_holds(client, run.info.run_id, both)
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"resolved_config.ini", "training_history.json", "provenance.json"} <= artifacts
    history = client.download_artifacts(run.info.run_id, "training_history.json", str(tmp_path))
    assert Path(history).read_bytes() == (run_dir / "training_history.json").read_bytes()


def test_an_mlflow_store_that_fails_mid_run_does_not_stop_logging_to_tensorboard(tmp_path, monkeypatch, caplog):
    import mlflow
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config = load_config(overrides=["logging.wandb_mode=disabled", "logging.mlflow=true"])
    tracker = Tracker(Accelerator(cpu=True), tmp_path, config, run_name="store_lost")
    tracker.log({"train/loss": 1.0}, step=1)
    client = mlflow.tracking.MlflowClient((tmp_path / "mlflow").as_uri())
    run_id = json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    assert [(metric.step, metric.value) for metric in client.get_metric_history(run_id, "train/loss")] == [(1, 1.0)]
    shutil.rmtree(tmp_path / "mlflow")  # the store is gone (a lost mount): every further MLflow call raises

    with caplog.at_level(logging.WARNING, logger="csi_dist.training.tracking"):
        tracker.log({"train/loss": 0.5}, step=2)
        tracker.log({"train/loss": 0.25}, step=3)
        tracker.summary({"best": 0.25})
        tracker.log_run_files()
        tracker.close()

    warnings = [record.message for record in caplog.records if "MLflow logging failed" in record.message]
    assert len(warnings) == 1 and "off for the rest of this run" in warnings[0]
    assert mlflow.active_run() is None  # a later training in this process starts its own MLflow run
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
