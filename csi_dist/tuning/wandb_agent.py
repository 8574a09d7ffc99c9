"""One W&B-sweep trial: `wandb agent` passes `--section.key=value`; apply the space's conditions, then train.

The command line comes from `<sweep-dir>/wandb_sweep.yaml` (written by csi_dist.sweep)::

    python -m csi_dist.tuning.wandb_agent --space configs/sweep/default.yaml --config my.ini [--set k=v] \\
        --optimization.learning_rate=0.001 --optimization.optimizer=sgd ...

W&B samples every parameter (it has no conditional ones); here a parameter whose `when` does not hold is dropped
(or replaced by its `otherwise` value), exactly as an Optuna trial of the same space would train.
"""
from __future__ import annotations

import argparse
import os
from datetime import datetime
from pathlib import Path

from csi_dist.core.command import run_command
from csi_dist.core.config import ConfigError
from csi_dist.tuning.space import load_space


def trial_overrides(space_path: Path, sampled: dict[str, str]) -> list[str]:
    space = load_space(space_path)
    applied: dict[str, object] = {}
    for parameter in space.params:
        value = sampled.get(parameter.name)
        if all(str(applied.get(key)) in [str(v) for v in values] for key, values in parameter.when.items()):
            if value is not None:
                applied[parameter.name] = value
        elif parameter.otherwise is not None:
            applied[parameter.name] = parameter.otherwise
    return [f"{key}={value}" for key, value in applied.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csi_dist.tuning.wandb_agent", description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, required=True)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run-dir", type=Path, help="default: runs/wandb-sweep/<W&B run id or timestamp>")
    args, sampled_args = parser.parse_known_args(argv)
    sampled: dict[str, str] = {}
    for arg in sampled_args:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not sep or "." not in key:
            parser.error(f"expected --section.key=value from the W&B agent, got {arg!r}")
        sampled[key] = value
    run_dir = args.run_dir or Path("runs") / "wandb-sweep" / os.environ.get(
        "WANDB_RUN_ID", f"{datetime.now():%Y%m%d_%H%M%S}")
    train_argv = ["--run-dir", str(run_dir)] + (["--config", str(args.config)] if args.config else [])
    try:
        applied = trial_overrides(args.space, sampled)
    except ConfigError as error:  # a damaged space file: exit 2 naming it, as the sweep driver does
        parser.error(str(error))
    for override in [*args.overrides, *applied]:
        train_argv += ["--set", override]
    from csi_dist.train import main as train_main
    return train_main(train_argv)


if __name__ == "__main__":
    run_command(main)
