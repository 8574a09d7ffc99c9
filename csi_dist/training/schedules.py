"""Optimizers and learning-rate schedules (warmup, then ReduceLROnPlateau, StepLR or cosine), built from the config.

Each piece is torch's own scheduler (LinearLR, CosineAnnealingLR, StepLR, ReduceLROnPlateau); only their composition
is ours, not torch's SequentialLR, because SequentialLR cannot give our learning rates for two of the four kinds
(compared step by step in tests/test_schedules.py):
- ReduceLROnPlateau: SequentialLR refuses it (its step needs the monitored value).
- StepLR: ours counts its epochs from the start of the run and steps it per epoch, warmup included; SequentialLR
  steps every scheduler per optimizer step and starts the second one at the warmup's end, so every decay lands
  `warmup_epochs` later (a factor `gamma` apart for that long, with a fractional warmup even mid-epoch).
For cosine and none, SequentialLR(LinearLR, CosineAnnealingLR / ConstantLR) gives the same learning rates to float
rounding (a few ulp apart after the warmup); two mechanisms for one schedule would buy nothing, and keeping
one keeps the checkpointed state ({"optimizer_steps", "warmup", "main"}) of existing runs loadable as it is.
"""
from __future__ import annotations

import math

import torch
from torch.optim import lr_scheduler

from csi_dist.core.config import OptimizationConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimizationConfig, fused: bool = False) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum from the config); fused kernels on GPU."""
    params = [param for param in model.parameters() if param.requires_grad]
    name = cfg.optimizer.lower()
    extra = {"fused": True} if fused else {}
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **extra)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **extra)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           **extra)


class LearningRateSchedule:
    """Linear warmup per optimizer step, then the configured schedule, each stepped at its own boundary.

    ReduceLROnPlateau follows the monitored validation value (min for val_loss, max for metrics); StepLR steps
    per epoch; cosine decays per optimizer step to `min_lr` over the run.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimizationConfig, *, steps_per_epoch: int,
                 n_epochs: int, monitor_mode: str):
        self.kind = cfg.scheduler.lower()
        self.warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
        total_steps = max(1, steps_per_epoch * n_epochs - self.warmup_steps)
        self.main: lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau | None = None
        if self.kind == "reducelronplateau":
            self.main = lr_scheduler.ReduceLROnPlateau(optimizer, mode=monitor_mode, factor=cfg.factor,
                                                       patience=cfg.patience, min_lr=cfg.min_lr)
        elif self.kind == "steplr":
            self.main = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        elif self.kind == "cosine":
            self.main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=cfg.min_lr)
        # built after the main schedule: constructing a torch scheduler resets the lr, and warmup must win
        self.warmup = (lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0,
                                             total_iters=self.warmup_steps) if self.warmup_steps > 0 else None)
        self.optimizer_steps = 0

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        if self.warmup is not None and self.optimizer_steps <= self.warmup_steps:
            self.warmup.step()
        elif self.kind == "cosine":
            self.main.step()

    def after_epoch(self) -> None:
        if self.kind == "steplr":
            self.main.step()

    def after_evaluation(self, monitored_value: float) -> None:
        if self.kind == "reducelronplateau" and math.isfinite(monitored_value):
            self.main.step(monitored_value)

    def state_dict(self) -> dict:
        return {"optimizer_steps": self.optimizer_steps,
                "warmup": self.warmup.state_dict() if self.warmup is not None else {},
                "main": self.main.state_dict() if self.main is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer_steps = state["optimizer_steps"]
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])
        if self.main is not None:
            self.main.load_state_dict(state["main"])
