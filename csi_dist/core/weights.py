"""Plain model weights files (safetensors): written atomically, read back, and the error a run's weights or
checkpoints raise when they cannot be used. Below training/ and evaluation/, which both read and write weights."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from csi_dist.core.files import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: wrong architecture, other world layout, unreadable file."""


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A plain full state dict as safetensors, atomically (loadable by evaluate and single-GPU runs)."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    atomic_write(path, lambda temporary: save_file(tensors, str(temporary)))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise CheckpointError(f"weights file not found: {path}")
    return load_file(str(path))
