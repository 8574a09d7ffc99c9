"""Convert a sharded checkpoint (DCP from DDP/FSDP2, or DeepSpeed ZeRO) into plain full weights (safetensors).

`python -m csi_dist.convert checkpoints/run/checkpoints/step-00001200 model.safetensors` gives a file that
`csi_dist.evaluate --weights` and single-GPU runs (`model.pretrained_weights` for fine-tuning) load. Runs in one
process on the CPU, whatever world size wrote the checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from csi_dist.command import run_command
from csi_dist.config import load_config
from csi_dist.models import build_model, model_input_size
from csi_dist.training.checkpoint import STRATEGY_STATE_DIR, CheckpointError, check_dcp_metadata, save_weights

log = logging.getLogger("csi_dist.convert")


def full_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    state_dir = checkpoint_dir / STRATEGY_STATE_DIR
    if (state_dir / "latest").is_file():  # DeepSpeed ZeRO: its own consolidation of the partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag="zero")
    if not (state_dir / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint_dir} holds neither a DCP nor a DeepSpeed checkpoint")
    check_dcp_metadata(state_dir)
    config_path = checkpoint_dir.parent.parent / "resolved_config.ini"
    config = load_config(config_path)
    # the template DCP fills, resharding as needed (a ViT's position embeddings have the training size)
    model = build_model(config.model, model_input_size(config.model, config.data.image_size))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=str(state_dir))
    return state["model"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csi_dist.convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step-XXXXXXXX directory")
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        weights = full_weights(args.checkpoint)
    except CheckpointError as error:
        log.error("%s", error)
        return 2
    save_weights(weights, args.output)
    log.info("wrote %d tensors to %s", len(weights), args.output)
    return 0


if __name__ == "__main__":
    run_command(main)
