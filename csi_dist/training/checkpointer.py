"""The run's stateful parts, saved and restored together through one checkpointer.

Each part saves and loads itself (`state_dict` / `load_state_dict`): the model and optimizer through the parallelism
strategy, the progress (where the run is), the learning-rate schedule, early stopping, and every rank's RNG streams;
rank 0 adds the run's provenance (csi_dist.core.provenance) and the best weights early stopping names (staged when an
evaluation improves, made part of the next checkpoint, published from it: see checkpoint_files.save_checkpoint).
The files and their atomic handling are csi_dist.training.checkpoint_files's; this module says what goes into them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from csi_dist.core.files import strict_json_value
from csi_dist.core.provenance import ProvenanceRecord
from csi_dist.training.checkpoint_files import (BEST_WEIGHTS_FILE, STATE_FILE, best_weights_path, checkpoint_root,
                                                load_checkpoint, publish_best_weights, save_checkpoint, save_weights,
                                                set_rng_state)
from csi_dist.training.early_stopping import EarlyStopping
from csi_dist.training.schedules import LearningRateSchedule

log = logging.getLogger(__name__)


@dataclass
class TrainingProgress:
    """Where the run is. `epoch_position` counts the samples of the epoch's order consumed so far, over all ranks,
    so it means the same on any world size (see data/shards/plan.py)."""

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


def saved_trainer_state(checkpoint: Path) -> dict | None:
    """The trainer state a checkpoint holds (progress, early stopping), read without loading it; None: unreadable
    (the restore then says why)."""
    try:
        return json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Checkpointer:
    """Saves the parts at a step (once per state) and restores them from a checkpoint directory."""

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
        self.last_saved: str | None = None  # the trainer state of the last save, as saved
        # rank 0: the file holding the best weights early stopping names (staged, or in the newest checkpoint)
        self.best_weights: Path | None = None
        self.staged_best = checkpoint_root(run_dir) / f"staged-{BEST_WEIGHTS_FILE}"
        if accelerator.is_main_process:  # a best staged by a process killed before its checkpoint: no state names it
            self.staged_best.unlink(missing_ok=True)

    def stage_best_weights(self, weights: dict) -> None:
        """Rank 0: the weights of an evaluation that improved, held for the next checkpoint (not yet published)."""
        save_weights(weights, self.staged_best)
        self.best_weights = self.staged_best

    def save(self) -> None:
        """A complete checkpoint of the current step on every rank together; nothing when this state is saved.

        The same step is saved again when an evaluation came after its save (a checkpoint at training.max_steps
        inside an epoch, then that step's validation): its history, early stopping and best weights belong in it."""
        trainer_state = self.progress.state_dict() | {"early_stopping": self.early_stopping.state_dict()}
        saved_as = json.dumps(strict_json_value(trainer_state), sort_keys=True)  # NaN-safe, and a copy
        if self.last_saved == saved_as:
            return
        self.last_saved = saved_as
        step = self.progress.global_step
        if self.provenance is not None:
            trainer_state["provenance"] = self.provenance.update(step)
        final = save_checkpoint(self.accelerator, self.strategy, self.run_dir, step, model=self.model,
                                optimizer=self.optimizer, schedule_state=self.schedule.state_dict(),
                                trainer_state=trainer_state, keep_last=self.keep_last, best_weights=self.best_weights)
        if self.best_weights is not None:  # rank 0; the published copy if keep_last removed this checkpoint already
            held = final / BEST_WEIGHTS_FILE
            self.best_weights = held if held.is_file() else best_weights_path(self.run_dir)
            self.staged_best.unlink(missing_ok=True)

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
        if self.accelerator.is_main_process:
            self.restore_best_weights(Path(path))
        self.accelerator.wait_for_everyone()  # weights/best.safetensors is the restored state's on every rank
        position = f", sample {self.progress.epoch_position} of it" if self.progress.epoch_position else ""
        log.info("continuing the run in %s from step %d (epoch %d%s); --resume fresh starts over (resumed from %s)",
                 self.run_dir, self.progress.global_step, self.progress.epoch, position, path)

    def restore_best_weights(self, checkpoint: Path) -> None:
        """weights/best.safetensors re-derived from the checkpoint restored: a kill between a checkpoint's rename and
        the publication of its best, or a resume from an older checkpoint, never leaves a best file that disagrees with
        the best value restored. A checkpoint written before best weights were part of it (an older csi_dist) names a
        best it does not hold: the run's weights/best.safetensors is taken as that best, as it was then."""
        if (checkpoint / BEST_WEIGHTS_FILE).is_file():
            self.best_weights = checkpoint / BEST_WEIGHTS_FILE
        elif self.early_stopping.best_epoch >= 0 and best_weights_path(self.run_dir).is_file():
            log.warning("%s holds no %s (written by an older csi_dist): keeping %s as the best weights", checkpoint,
                        BEST_WEIGHTS_FILE, best_weights_path(self.run_dir))
            self.best_weights = best_weights_path(self.run_dir)
            return
        else:
            self.best_weights = None
        publish_best_weights(checkpoint, self.run_dir)
