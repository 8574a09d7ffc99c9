"""One optimizer update over an accumulation window: the training step the Trainer, the Python API and the bench run.

Read top to bottom: the window's loss scale, then per micro-batch the forward pass under autocast, the masked,
class-weighted loss as this micro-batch's share of the window's global mean, the backward pass (gradients synced
over ranks on the last micro-batch only), and the strategy's step, which at the window's end clips, checks the
gradients are finite and updates or skips. A skipped update also puts BatchNorm's statistics back.

What a step needs from its surroundings is small: a `strategy` (training/strategies.py: gradient_sync, backward,
step), and an `accelerator` for autocast and the reduction of the window's weight over ranks (accelerate's
Accelerator, or `SingleProcess` for one process without accelerate).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from csi_dist.faults import with_nonfinite_image
from csi_dist.loss import WeightedCSILoss
from csi_dist.training.accumulation import BufferSnapshot, window_loss_scale

# (host batch, images, zone targets, sample mask) of one micro-batch, on the device (inference.device_batches)
MicroBatch = tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]
# after each micro-batch: (host batch, images, its loss share, seconds the strategy's step took)
MicroBatchHook = Callable[[object, torch.Tensor, torch.Tensor, float], None]


@dataclass(frozen=True)
class StepFaults:
    """Faults a test injects into this step (csi_dist/faults.py); none in a real run."""

    image_value: float | None = None  # the first micro-batch's first image becomes this value (nan, inf)
    loss_factor: float | None = None  # every micro-batch's loss is multiplied by this (nan, inf)


NO_FAULTS = StepFaults()


def train_step(model: torch.nn.Module, window: list[MicroBatch], *, criterion: WeightedCSILoss, strategy, optimizer,
               accelerator, buffers: BufferSnapshot, faults: StepFaults = NO_FAULTS,
               after_micro_batch: MicroBatchHook | None = None) -> bool:
    """One update from the micro-batches of `window`; True if the optimizer stepped, False if it was skipped."""
    loss_scale = window_loss_scale(criterion, window, accelerator)
    buffers.take()
    stepped = None
    for index, (batch, images, zone_targets, sample_mask) in enumerate(window):
        is_update_step = index == len(window) - 1
        with strategy.gradient_sync(model, enabled=is_update_step):
            if index == 0 and faults.image_value is not None:
                images = with_nonfinite_image(images, faults.image_value)
            with accelerator.autocast():
                zone_logits = model(images)
            loss_sum, _ = criterion.weighted_sum(zone_logits, zone_targets, sample_mask)
            loss = loss_sum * loss_scale  # this micro-batch's share of the window's global mean
            if faults.loss_factor is not None:
                loss = loss * faults.loss_factor
            strategy.backward(loss)
        step_started = time.perf_counter()
        stepped = strategy.step(model, optimizer, is_update_step)
        if after_micro_batch is not None:
            after_micro_batch(batch, images, loss, time.perf_counter() - step_started)
    if not stepped:
        buffers.restore()
    return bool(stepped)


class SingleProcess:
    """What the step and predict_split ask of an Accelerator, for one process without accelerate: a device,
    autocast (bf16 or none), and identity reductions."""

    num_processes = 1

    def __init__(self, device: torch.device, autocast_dtype: torch.dtype | None = None):
        self.device, self.autocast_dtype = device, autocast_dtype

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @staticmethod
    def reduce(tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor
