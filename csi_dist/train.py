"""Train a CSI model: `python -m csi_dist.train --config configs/demo.ini [--set section.key=value]`; several processes:
`python -m csi_dist.launcher --config_file launch/accelerate/ddp.yaml -m csi_dist.train ...` (README, Training).

The command line: settings in, the documented exit code out (see README, Outcomes). The loop itself is
csi_dist.training.loop.train.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from csi_dist.cluster.slurm import requeue_after_failure
from csi_dist.core.command import run_command
from csi_dist.core.config import Config, ConfigError, config_reference, load_config, section_of
from csi_dist.core.exit_codes import (EXIT_CONFIG_ERROR, EXIT_RANK_LOST, EXIT_TOO_MANY_BAD_SAMPLES,
                                     EXIT_TOO_MANY_BAD_STEPS)
from csi_dist.core.redaction import install_secret_filter
from csi_dist.core.run_dir import DEBUG_SUFFIX, MOVED_ASIDE, RunDir, default_run_dir

log = logging.getLogger("csi_dist.train")

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="csi_dist.train", description=" ".join(__doc__.split("\n\n")[0].split()),
                                     epilog="Every config key with its default: --help-config.")
    parser.add_argument("--config", type=Path, help="INI file (the seed project's files load unchanged); required")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set training.batch_size=16 (repeatable; default: "
                             "none, the config file as it is)")
    parser.add_argument("--hyperparams", type=Path, help="best_params.json of a sweep: its values override the config "
                        "(default: none)")
    parser.add_argument("--run-dir", type=Path, help="where the run lives (default: "
                        "<logging.output_dir>/<logging.run_name>, the run name being <date>_<time>_<model> when "
                        "logging.run_name is empty)")
    parser.add_argument("--resume", default="auto",
                        help="auto (continue the run in the run dir from its newest complete checkpoint, or start "
                             "one), never (start a new run; refused when the run dir holds one), fresh (move the run "
                             f"dir's run aside to <run dir>{MOVED_ASIDE}<date>, nothing deleted, then start a new "
                             "run), or a checkpoint path (default: auto)")
    parser.add_argument("--debug", action="store_true",
                        help=f"a few tiny steps, no workers, no W&B, into <run dir>{DEBUG_SUFFIX} (never the real run; "
                             "default: off)")
    parser.add_argument("--help-config", action="store_true", help="print every config key with its type, default, "
                        "accepted values and meaning, then exit")
    return parser.parse_args(argv)


def debug_overrides() -> list[str]:
    return ["training.batch_size=2", "training.max_steps=3", "training.n_epochs=1", "data.num_workers=0",
            "training.log_every_steps=1", "logging.wandb_mode=disabled"]


def hyperparameter_overrides(path: Path | None) -> list[str]:
    if path is None:
        return []
    import json
    try:
        best = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"--hyperparams {path}: {error}") from None
    params = best.get("best_params", best)
    return [f"{key if '.' in key else section_of(key) + '.' + key}={value}" for key, value in params.items()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    install_secret_filter()
    if args.help_config:
        print(config_reference())
        return 0
    try:
        config, run_dir = config_and_run_dir(args)
    except ConfigError as error:  # answered before torch and the trainer load (a second or so)
        log.error("%s", error)
        return EXIT_CONFIG_ERROR
    return run_training(config, run_dir, args.resume)


def config_and_run_dir(args: argparse.Namespace) -> tuple[Config, Path]:
    """The validated config and the run directory of the trainer's arguments (ConfigError naming the key), without
    torch: what `main` trains and what `csi_dist.submit` checks before it submits."""
    if args.config is None:
        raise ConfigError("no --config given: name an INI file, e.g. --config configs/demo.ini (the seed "
                          "project's files load unchanged); `python -m csi_dist.train --help-config` lists "
                          "every key")
    overrides = hyperparameter_overrides(args.hyperparams) + args.overrides
    config = load_config(args.config, overrides + (debug_overrides() if args.debug else []))
    run_dir = args.run_dir or default_run_dir(config.logging.output_dir, config.logging.run_name,
                                              config.model.model_arch)
    if args.debug:  # a debug run must never resume or overwrite the real run's checkpoints and weights
        run_dir = RunDir(run_dir).debug.root
    return config, run_dir


def run_training(config: Config, run_dir: Path, resume: str) -> int:
    """The trainer on a validated config; its failures as the documented exit codes."""
    from csi_dist.data.quality import TooManyBadSamples
    from csi_dist.data.shards.reader import ShardError
    from csi_dist.core.distributed import is_collective_failure, leave_process_group
    from csi_dist.model.factory import ModelError
    from csi_dist.training.checkpoint_files import CheckpointError
    from csi_dist.training.loop import TooManyBadSteps, train
    try:
        return train(config, run_dir, resume)
    except (ConfigError, ShardError, ModelError, CheckpointError) as error:
        log.error("%s", error)
        return EXIT_CONFIG_ERROR
    except TooManyBadSteps as error:  # every rank counts the same skipped steps: all of them stop here
        log.error("%s", error)
        leave_process_group()
        return EXIT_TOO_MANY_BAD_STEPS
    except TooManyBadSamples as error:  # decided on counts summed over all ranks: all of them stop here
        log.error("%s", error)
        leave_process_group()
        return EXIT_TOO_MANY_BAD_SAMPLES
    except RuntimeError as error:
        if not is_collective_failure(error):
            raise
        # no checkpoint now: saving is itself a collective. The newest complete one is where the run goes on.
        log.error("lost contact with another rank (it died, hung for training.collective_timeout_s=%d s or lost its "
                  "network): %s: %s. Stopping this rank; --resume auto continues from the newest complete checkpoint",
                  config.training.collective_timeout_s, type(error).__name__, str(error).splitlines()[0])
        requeue_after_failure(run_dir, config.callbacks.max_failure_requeues)
        return EXIT_RANK_LOST


if __name__ == "__main__":
    run_command(main)
