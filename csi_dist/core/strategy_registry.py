"""Which parallelism strategies exist: one line each, read without torch (config choices, launcher detection, convert).

Adding a strategy is its module (a class meeting `strategies.Strategy`) plus one line here. The trainer, convert and
the config never name a strategy: they ask this registry for the class, then ask the class what it can do.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StrategyEntry:
    name: str  # training.strategy
    target: str  # "module:Class"
    launcher_variable: str | None  # set (true) by `accelerate launch` / csi_dist.launcher for this strategy's yaml
    checkpoint_marker: str  # a file in a checkpoint's strategy directory that only this strategy's format writes
    needs_model_template: bool  # convert builds the run's model for the format to fill (DCP); else it needs none

    def strategy_class(self):
        module_name, class_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), class_name)


REGISTRY = {entry.name: entry for entry in (
    StrategyEntry("ddp", "csi_dist.training.strategies:DDPStrategy", None, ".metadata", True),
    StrategyEntry("fsdp2", "csi_dist.training.strategies:FSDP2Strategy", "ACCELERATE_USE_FSDP", ".metadata", True),
    StrategyEntry("deepspeed", "csi_dist.training.deepspeed_strategy:DeepSpeedStrategy", "ACCELERATE_USE_DEEPSPEED",
                  "latest", False),
)}
DEFAULT = "ddp"
STRATEGY_STATE_DIR = "state"  # <checkpoint>/state: the strategy's own files (DCP or DeepSpeed's)
_TRUE = ("1", "true", "yes")


def resolve_strategy(configured: str) -> str:
    """The strategy asked for by the launcher's environment, else by training.strategy (auto = DDP)."""
    for entry in REGISTRY.values():
        if entry.launcher_variable and os.environ.get(entry.launcher_variable, "").lower() in _TRUE:
            return entry.name
    return DEFAULT if configured == "auto" else configured


def hide_from_accelerate() -> None:
    """Stop Accelerator() from applying its own FSDP/DeepSpeed plugin: csi_dist's strategies apply themselves."""
    for entry in REGISTRY.values():
        if entry.launcher_variable:
            os.environ.pop(entry.launcher_variable, None)


def checkpoint_format(state_dir: Path) -> StrategyEntry | None:
    """The first strategy whose format `state_dir` holds (DDP's and FSDP2's are one: DCP), None when none does."""
    return next((entry for entry in REGISTRY.values() if (Path(state_dir) / entry.checkpoint_marker).is_file()), None)
