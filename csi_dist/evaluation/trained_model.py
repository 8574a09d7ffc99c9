"""A trained run's model with its weights: what evaluate, predict and export start from (and heatmap studies)."""
from __future__ import annotations

from pathlib import Path

import torch

from csi_dist.model.factory import build_model, model_input_size, uses_channels_last
from csi_dist.core.run_dir import RunDir
from csi_dist.core.weights import CheckpointError, load_weights


def load_trained_model(config, run_dir: Path, weights: str, accelerator) -> tuple[torch.nn.Module, Path, bool, int]:
    """(model prepared for inference, weights file, channels_last, input size) of a run: what evaluate and predict
    both run."""
    model, path, image_size = trained_model(config, run_dir, weights)
    channels_last = uses_channels_last(config.model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return accelerator.prepare_model(model, evaluation_mode=True), path, channels_last, image_size


def trained_model(config, run_dir: Path, weights: str) -> tuple[torch.nn.Module, Path, int]:
    """(the run's model on the CPU with its weights loaded, weights file, input size): what evaluate, predict and
    export start from."""
    image_size = model_input_size(config.model, config.data.image_size)
    model = build_model(config.model, image_size)
    path = weights_path(run_dir, weights)
    try:
        model.load_state_dict(load_weights(path))
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit {config.model.model_arch}: {error}") from None
    return model, path, image_size


def weights_path(run_dir: Path, weights: str) -> Path:
    if weights in ("best", "last"):
        path = RunDir(run_dir).weights(weights)
        if weights == "best" and not path.is_file():
            path = RunDir(run_dir).last_weights
        return path
    return Path(weights)
