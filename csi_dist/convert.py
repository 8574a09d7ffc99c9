"""Convert a sharded checkpoint (DCP from DDP/FSDP2, or DeepSpeed ZeRO) into plain full weights (safetensors).

`python -m csi_dist.convert checkpoints/run/checkpoints/step-00001200 model.safetensors` gives a file that
`csi_dist.evaluate --weights` and single-GPU runs (`model.pretrained_weights` for fine-tuning) load. Runs in one
process on the CPU, whatever world size wrote the checkpoint. Like a resume, it unpickles nothing but plain data: a
checkpoint with anything else in a file is refused (exit 2, naming the file) before any of it runs.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from csi_dist.core.command import run_command
from csi_dist.core.config import Config, ConfigError, load_config
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR
from csi_dist.core.run_dir import RunDir
from csi_dist.core.strategy_registry import REGISTRY, STRATEGY_STATE_DIR, checkpoint_format

if TYPE_CHECKING:
    import torch

# torch, DCP and DeepSpeed are imported after the arguments and the run's config are checked: a usage error or a bad
# config is answered in a second (issue 34)

log = logging.getLogger("csi_dist.convert")


def needs_run_config(checkpoint_dir: Path) -> bool:
    """Whether converting `checkpoint_dir` builds the run's model from its config (a DCP checkpoint of DDP or FSDP2
    fills one; DeepSpeed's consolidates its own): asked of the strategy registry, from the files alone, before torch
    loads."""
    entry = checkpoint_format(checkpoint_dir / STRATEGY_STATE_DIR)
    return entry is not None and entry.needs_model_template


def run_config(checkpoint_dir: Path) -> Config:
    """The config of the run a checkpoint belongs to (<run>/checkpoints/step-XXXXXXXX): the model DCP fills."""
    return load_config(RunDir(checkpoint_dir.parent.parent).resolved_config)


def full_weights(checkpoint_dir: Path, config: Config | None = None) -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint of any registered strategy: the strategy whose format it holds reads it."""
    from csi_dist.model.factory import build_model, model_input_size
    from csi_dist.training.checkpoint_files import CheckpointError
    state_dir = checkpoint_dir / STRATEGY_STATE_DIR
    entry = checkpoint_format(state_dir)
    if entry is None:
        raise CheckpointError(f"{checkpoint_dir} holds no checkpoint of a known strategy (none of "
                              f"{', '.join(sorted(REGISTRY))})")

    def template() -> torch.nn.Module:  # the run's model, for formats that fill one
        run = config or run_config(checkpoint_dir)
        return build_model(run.model, model_input_size(run.model, run.data.image_size))
    return entry.strategy_class().checkpoint_weights(state_dir, template)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csi_dist.convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory, <run dir>/checkpoints/step-XXXXXXXX")
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:  # the run's config, checked before torch loads
        config = run_config(args.checkpoint) if needs_run_config(args.checkpoint) else None
    except ConfigError as error:
        log.error("cannot convert %s: %s", args.checkpoint, error)
        return EXIT_CONFIG_ERROR
    from csi_dist.model.factory import ModelError
    from csi_dist.training.checkpoint_files import CheckpointError, save_weights
    try:
        weights = full_weights(args.checkpoint, config)
    except (CheckpointError, ConfigError, ModelError) as error:  # the template model comes from the run's config
        log.error("cannot convert %s: %s", args.checkpoint, error)
        return EXIT_CONFIG_ERROR
    save_weights(weights, args.output)
    log.info("wrote %d tensors to %s", len(weights), args.output)
    return 0


if __name__ == "__main__":
    run_command(main)
