"""The run's stateful parts, saved and restored together through one checkpointer.

Each part saves and loads itself (`state_dict` / `load_state_dict`): the model and optimizer through the parallelism
strategy, the progress (where the run is), the learning-rate schedule, early stopping, and every rank's RNG streams;
rank 0 adds the run's provenance (csi_dist.provenance).
The files and their atomic handling are csi_dist.training.checkpoint's; this module says what goes into them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from csi_dist.provenance import ProvenanceRecord
from csi_dist.training.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from csi_dist.training.early_stopping import EarlyStopping
from csi_dist.training.schedules import LearningRateSchedule

log = logging.getLogger(__name__)


@dataclass
class TrainingProgress:
    """Where the run is. `epoch_position` counts the samples of the epoch's order consumed so far, over all ranks,
    so it means the same on any world size (see data.shard_plan)."""

    world_size: int
    epoch: int = 0
    epoch_position: int = 0
    global_step: int = 0  # optimizer updates, skipped ones included
    bad_steps: int = 0  # updates skipped for a non-finite loss or gradient
    history: list[dict] = field(default_factory=list)  # one record per validation

    RESUMED_KEYS = ("epoch", "epoch_position", "global_step", "history", "bad_steps")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epoch_position": self.epoch_position, "global_step": self.global_step,
                "history": self.history, "bad_steps": self.bad_steps, "world_size": self.world_size}

    def load_state_dict(self, saved: dict) -> None:
        """Everything but the world size, which is the one this process runs on."""
        for key in self.RESUMED_KEYS:
            setattr(self, key, saved[key])

    def next_epoch(self) -> None:
        self.epoch, self.epoch_position = self.epoch + 1, 0


class Checkpointer:
    """Saves the parts at a step (once per step) and restores them from a checkpoint directory."""

    def __init__(self, run_dir: Path, accelerator, strategy, model, optimizer, *, progress: TrainingProgress,
                 schedule: LearningRateSchedule, early_stopping: EarlyStopping, keep_last: int,
                 provenance: ProvenanceRecord | None = None):
        self.run_dir = run_dir
        self.accelerator = accelerator
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.progress = progress
        self.schedule = schedule
        self.early_stopping = early_stopping
        self.keep_last = keep_last
        self.provenance = provenance  # rank 0's record; each checkpoint carries a copy
        self.last_saved_step = -1

    def save(self) -> None:
        """A complete checkpoint of the current step on every rank together; nothing when this step is saved."""
        step = self.progress.global_step
        if self.last_saved_step == step:
            return
        self.last_saved_step = step
        trainer_state = self.progress.state_dict() | {"early_stopping": self.early_stopping.state_dict()}
        if self.provenance is not None:
            trainer_state["provenance"] = self.provenance.update(step)
        save_checkpoint(self.accelerator, self.strategy, self.run_dir, step, model=self.model,
                        optimizer=self.optimizer, schedule_state=self.schedule.state_dict(),
                        trainer_state=trainer_state, keep_last=self.keep_last)

    def restore(self, path: Path) -> None:
        """Every part from `path`; the RNG streams only on the world size they were saved on (on another one the
        dropout streams start afresh)."""
        loaded = load_checkpoint(self.strategy, path, self.model, self.optimizer, self.accelerator.process_index)
        self.schedule.load_state_dict(loaded["schedule"])
        saved = loaded["trainer_state"]
        self.early_stopping.load_state_dict(saved["early_stopping"])
        self.progress.load_state_dict(saved)
        if loaded["rng"] is not None and saved["world_size"] == self.progress.world_size:
            set_rng_state(loaded["rng"])
        log.info("resumed from %s: epoch %d, sample %d of the epoch, %d optimizer steps",
                 path, self.progress.epoch, self.progress.epoch_position, self.progress.global_step)
