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

from csi_dist.command import run_command
from csi_dist.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    import torch

# torch, DCP and DeepSpeed are imported after the arguments and the run's config are checked: a usage error or a bad
# config is answered in a second (issue 34)

log = logging.getLogger("csi_dist.convert")


def needs_run_config(checkpoint_dir: Path) -> bool:
    """Whether converting `checkpoint_dir` builds the run's model, from its config: a DCP checkpoint (DDP, FSDP2)
    does, a DeepSpeed one does not. Told from the files alone, before torch loads."""
    return not any(checkpoint_dir.glob("*/latest")) and any(checkpoint_dir.glob("*/.metadata"))


def run_config(checkpoint_dir: Path) -> Config:
    """The config of the run a checkpoint belongs to (<run>/checkpoints/step-XXXXXXXX): the model DCP fills."""
    return load_config(checkpoint_dir.parent.parent / "resolved_config.ini")


def full_weights(checkpoint_dir: Path, config: Config | None = None) -> dict[str, torch.Tensor]:
    from csi_dist.models import build_model, model_input_size
    from csi_dist.training.checkpoint import STRATEGY_STATE_DIR, CheckpointError, read_dcp, unusable_because
    from csi_dist.training.strategies import ZERO_TAG, check_deepspeed_state
    state_dir = checkpoint_dir / STRATEGY_STATE_DIR
    if (state_dir / "latest").is_file():  # DeepSpeed ZeRO: its own consolidation of the partitions
        check_deepspeed_state(state_dir / ZERO_TAG)  # zero_to_fp32 unpickles with weights_only=False
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag=ZERO_TAG)
        except Exception as error:  # noqa: BLE001 - a damaged or partial ZeRO checkpoint: one line, not a traceback
            raise CheckpointError(unusable_because(error)) from None
    if not (state_dir / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint_dir} holds neither a DCP nor a DeepSpeed checkpoint")
    config = config or run_config(checkpoint_dir)
    # the template DCP fills, resharding as needed (a ViT's position embeddings have the training size)
    model = build_model(config.model, model_input_size(config.model, config.data.image_size))
    state = {"model": model.state_dict()}
    read_dcp(state, state_dir)
    return state["model"]


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
        return 2
    from csi_dist.models import ModelError
    from csi_dist.training.checkpoint import CheckpointError, save_weights
    try:
        weights = full_weights(args.checkpoint, config)
    except (CheckpointError, ConfigError, ModelError) as error:  # the template model comes from the run's config
        log.error("cannot convert %s: %s", args.checkpoint, error)
        return 2
    save_weights(weights, args.output)
    log.info("wrote %d tensors to %s", len(weights), args.output)
    return 0


if __name__ == "__main__":
    run_command(main)
