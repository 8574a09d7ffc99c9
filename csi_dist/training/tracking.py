"""Experiment tracking on rank 0: TensorBoard always, Weights & Biases offline by default (online if configured)."""
from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

from csi_dist.config import Config, config_to_dict
from csi_dist.redaction import masked_argv, redact

log = logging.getLogger(__name__)


def wandb_config(config: Config) -> dict[str, dict[str, object]]:
    """The config as W&B stores it, with secrets masked like in the saved config and the logs."""
    return {section: {key: redact(value) if isinstance(value, str) else value for key, value in values.items()}
            for section, values in config_to_dict(config).items()}


class Tracker:
    """Scalars to TensorBoard (`<run_dir>/tensorboard`) and W&B (`<run_dir>/wandb`); a no-op on other ranks."""

    def __init__(self, run_dir: Path, config: Config, run_name: str, enabled: bool):
        self.tensorboard = None
        self.wandb_run = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        mode = config.logging.wandb_mode
        if mode != "disabled":
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            # one id per run directory: every requeued segment of a run lands in the same W&B run;
            # under `wandb agent` the agent has already chosen the id its sweep expects
            run_id = (os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID")
                      else None) or hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
            masked = wandb_config(config)
            with masked_argv():
                self.wandb_run = wandb.init(
                    project=masked["logging"]["wandb_project"], group=masked["logging"]["wandb_group"] or None,
                    name=run_name, id=run_id, resume="allow", mode=mode, dir=str(run_dir), config=masked,
                    settings=wandb.Settings(init_timeout=120, console="off", x_disable_stats=True))

    def log(self, values: dict[str, float], step: int) -> None:
        finite = {key: float(value) for key, value in values.items()
                  if isinstance(value, (int, float)) and math.isfinite(value)}
        if self.tensorboard is not None:
            for key, value in finite.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self._to_wandb(lambda: self.wandb_run.log(finite, step=step))

    def summary(self, values: dict[str, object]) -> None:
        if self.wandb_run is not None:
            self._to_wandb(lambda: self.wandb_run.summary.update(values))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self._to_wandb(self.wandb_run.finish)

    def _to_wandb(self, call) -> None:
        """A W&B failure (full disk, lost connection) must not end a training run: warn once, then stop W&B."""
        try:
            call()
        except Exception as error:  # noqa: BLE001 - any W&B error; TensorBoard keeps logging
            log.warning("W&B logging failed (%s: %s); W&B is off for the rest of this run, TensorBoard goes on",
                        type(error).__name__, error)
            self.wandb_run = None
