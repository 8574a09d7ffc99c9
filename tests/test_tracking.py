"""Tracking: a W&B failure mid-run is survived (warned once, W&B off), TensorBoard keeps every scalar."""
from __future__ import annotations

import logging

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from csi_dist.config import load_config
from csi_dist.training.tracking import Tracker


def test_a_wandb_run_that_dies_does_not_stop_logging_to_tensorboard(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = load_config(overrides=["logging.wandb_mode=offline"])
    tracker = Tracker(tmp_path, config, run_name="dies", enabled=True)
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
