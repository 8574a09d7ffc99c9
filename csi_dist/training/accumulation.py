"""Gradient accumulation windows: the micro-batches whose summed gradients make one update of the global batch."""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch

from csi_dist.loss import WeightedCSILoss

Batch = TypeVar("Batch")


def accumulation_windows(batches: Iterable[Batch], accumulation: int) -> Iterator[list[Batch]]:
    """Consecutive groups of `accumulation` batches from where the loader starts (a resume starts a window); the
    last group of an epoch may be shorter and is still a full update, never lost or merged into the next epoch."""
    window: list[Batch] = []
    for batch in batches:
        window.append(batch)
        if len(window) == accumulation:
            yield window
            window = []
    if window:
        yield window


def window_loss_scale(criterion: WeightedCSILoss, window: list[tuple], accelerator) -> torch.Tensor:
    """The factor that turns a micro-batch's class-weighted loss sum into its share of the window's global mean.

    The divisor is the class-weighted number of real zones in the whole window on all ranks (one all-reduce per
    update; padding and undecodable images weigh nothing), and the factor carries the world size because every
    strategy averages gradients over ranks. Summed over the window, the gradients then equal those of one process
    seeing all A*B*W images at once. `window` holds (host batch, images, zone targets, sample mask) tuples.
    """
    local_weight = sum(criterion.zone_weights(zone_targets, sample_mask).sum()
                       for _, _, zone_targets, sample_mask in window)
    global_weight = accelerator.reduce(local_weight.detach().float(), reduction="sum")
    return accelerator.num_processes / global_weight.clamp_min(1e-12)
