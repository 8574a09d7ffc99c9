"""Gradient accumulation windows: the micro-batches whose summed gradients make one update of the global batch."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, TypeVar

import torch

from csi_dist.core.config import ConfigError, TrainingConfig
from csi_dist.model.loss import WeightedCSILoss

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
    would otherwise leave NaN statistics that every later evaluation uses. `take` before the window, `restore` when
    the update is skipped, or `restore_where(skipped)` on the device when only the device knows (the flag selects,
    it never multiplies: a NaN statistic must not leak through 0 * NaN). Buffers are saved into one flat tensor per
    dtype and device, so each of these is one or three kernel launches, not one per buffer.
    """

    def __init__(self, model: torch.nn.Module):
        groups: dict[tuple, list[torch.Tensor]] = {}
        for buffer in model.buffers():
            groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
        self.groups = [_BufferGroup(buffers) for buffers in groups.values()]

    def take(self) -> None:
        for group in self.groups:
            torch._foreach_copy_(group.saved_views, group.buffers)

    def restore(self) -> None:
        for group in self.groups:
            torch._foreach_copy_(group.buffers, group.saved_views)

    def restore_where(self, skipped: torch.Tensor) -> None:
        """Put the saved buffers back where `skipped` (a 0-d bool on the buffers' device) is True, else keep them."""
        for group in self.groups:
            torch._foreach_copy_(group.current_views, group.buffers)
            torch.where(skipped, group.saved, group.current, out=group.current)
            torch._foreach_copy_(group.buffers, group.current_views)


class _BufferGroup:
    """Buffers of one dtype and device, with two flat tensors of their total size and per-buffer views into them."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = buffers
        total = sum(buffer.numel() for buffer in buffers)
        self.saved = torch.empty(total, dtype=buffers[0].dtype, device=buffers[0].device)
        self.current = torch.empty_like(self.saved)
        self.saved_views, self.current_views = self._views(self.saved), self._views(self.current)
        self.saved.copy_(torch.cat([buffer.reshape(-1) for buffer in buffers]))

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for buffer in self.buffers:
            views.append(flat[offset:offset + buffer.numel()].view(buffer.shape))
            offset += buffer.numel()
        return views


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
