"""Gradient accumulation windows: the micro-batches whose summed gradients make one update of the global batch."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, TypeVar

import torch

from csi_dist.config import ConfigError, TrainingConfig
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


class BufferSnapshot:
    """The model's buffers (BatchNorm running statistics and counts) as they were before an update's forward passes.

    A forward pass in train mode folds its batch into BatchNorm's running statistics before any loss exists, so an
    update skipped for a non-finite loss or gradient must also put the buffers back: one non-finite activation
    would otherwise leave NaN statistics that every later evaluation uses. `take` before the window (one fused
    copy per update), `restore` when the update is skipped.
    """

    def __init__(self, model: torch.nn.Module):
        self.buffers = list(model.buffers())
        self.saved = [buffer.clone() for buffer in self.buffers]

    def take(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)


def split_global_batch(global_batch: int, world_size: int, max_micro_batch: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) that make `global_batch` images per update on `world_size`
    processes, with the fewest accumulation steps whose micro-batch is at most `max_micro_batch`."""
    for accumulation in range(1, global_batch + 1):
        per_micro_step = world_size * accumulation
        if global_batch % per_micro_step == 0 and global_batch // per_micro_step <= max_micro_batch:
            return global_batch // per_micro_step, accumulation
    raise ConfigError(f"training.global_batch_size = {global_batch} cannot be split into equal micro-batches of at "
                      f"most training.batch_size = {max_micro_batch} over {world_size} processes: choose a global "
                      f"batch that is a multiple of the process count (e.g. {world_size * max_micro_batch})")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How one update's global batch is made on this world size, computed once at start-up (batch_plan, then the
    GPU's micro-batch fit) and logged; the config is never rewritten with it."""

    world_size: int
    micro_batch: int  # images per process per forward pass
    accumulation: int  # micro-batches per optimizer update

    @property
    def images_per_micro_step(self) -> int:
        return self.micro_batch * self.world_size

    @property
    def global_batch(self) -> int:
        return self.images_per_micro_step * self.accumulation

    def __str__(self) -> str:
        return (f"global batch {self.global_batch} = {self.world_size} process(es) x micro-batch {self.micro_batch} x "
                f"{self.accumulation} accumulation step(s)")


def batch_plan(training: TrainingConfig, world_size: int) -> BatchPlan:
    """The batch this world size runs: with `global_batch_size` set, the micro-batch and accumulation that keep it
    (a requeue onto fewer or more processes trains on the same global batches in the same order); otherwise
    training.batch_size x training.gradient_accumulation_steps as they are."""
    if not training.global_batch_size:
        return BatchPlan(world_size, training.batch_size, training.gradient_accumulation_steps)
    return BatchPlan(world_size, *split_global_batch(training.global_batch_size, world_size, training.batch_size))
