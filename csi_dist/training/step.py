"""One optimizer update over an accumulation window: the training step the Trainer, the Python API and the bench run.

Read top to bottom: the window's loss scale, then per micro-batch the forward pass under autocast, the masked,
class-weighted loss as this micro-batch's share of the window's global mean, the backward pass (gradients synced
over ranks on the last micro-batch only), and the strategy's step, which at the window's end clips, checks the
gradients are finite and updates or skips. A skipped update also puts BatchNorm's statistics back.

What a step needs from its surroundings is small: a `strategy` (training/strategies.py: gradient_sync, backward,
step), and an `accelerator` for autocast and the reduction of the window's weight over ranks (accelerate's
Accelerator, or `SingleProcess` for one process without accelerate).

No host sync where the optimizer can skip on the device (fused Adam/AdamW, strategies.skips_on_device): the update's
outcome stays on the GPU (`UpdateOutcome`), BatchNorm's statistics are put back there too, and the host runs ahead
launching the next step while the GPU computes this one. The host reads the outcome one update later
(`UpdateLedger`), when the next update needs the learning rate it implies, or before the trainer logs, saves or stops.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from csi_dist.core.faults import with_nonfinite_image
from csi_dist.model.loss import WeightedCSILoss
from csi_dist.training.accumulation import BufferSnapshot, window_loss_scale
from csi_dist.training.host_copy import HostCopy

# (host batch, images, zone targets, sample mask) of one micro-batch, on the device (inference.device_batches)
MicroBatch = tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]
# after each micro-batch: (host batch, images, its loss share, seconds the strategy's step waited for the device)
MicroBatchHook = Callable[[object, torch.Tensor, torch.Tensor, float], None]


class UpdateOutcome:
    """Whether an update stepped or was skipped (non-finite gradients): known at once when the strategy decided on
    the host, or still on the device when the optimizer skipped there; then `stepped()` waits for the GPU only up
    to this update (a HostCopy of its flag), not for the work queued after it."""

    def __init__(self, stepped: bool | None = None, skipped: torch.Tensor | None = None):
        self._stepped = stepped
        self.skipped = skipped  # 0-d bool on the device, True where the update was skipped; None when known at once
        self._skipped_on_host = None if skipped is None else HostCopy(skipped)

    def stepped(self) -> bool:
        if self._stepped is None:
            self._stepped = not bool(self._skipped_on_host.read())
        return self._stepped


class UpdateLedger:
    """The last update whose outcome the host has not read yet, and what follows from it: `on_stepped()` (the learning
    rate schedule's step) or `on_skipped(where)` (the bad-step count). `settle` reads it; the trainer settles before
    an update's optimizer step (the learning rate it uses follows from the update before) and before it logs, saves
    or stops, so a checkpoint never holds an unsettled update."""

    def __init__(self, on_stepped: Callable[[], None], on_skipped: Callable[[object], None]):
        self.on_stepped, self.on_skipped = on_stepped, on_skipped
        self.pending: tuple[UpdateOutcome, object] | None = None

    def record(self, outcome: UpdateOutcome, where: object) -> None:
        self.settle()
        self.pending = (outcome, where)

    def settle(self) -> float:
        """Read the pending outcome, if any; returns the seconds spent waiting for the device."""
        if self.pending is None:
            return 0.0
        (outcome, where), self.pending = self.pending, None
        started = time.perf_counter()
        stepped = outcome.stepped()
        waited = time.perf_counter() - started
        if stepped:
            self.on_stepped()
        else:
            self.on_skipped(where)
        return waited


@dataclass(frozen=True)
class StepFaults:
    """Faults a test injects into this step (csi_dist/core/faults.py); none in a real run."""

    image_value: float | None = None  # the first micro-batch's first image becomes this value (nan, inf)
    loss_factor: float | None = None  # every micro-batch's loss is multiplied by this (nan, inf)


NO_FAULTS = StepFaults()


def train_step(model: torch.nn.Module, window: list[MicroBatch], *, criterion: WeightedCSILoss, strategy, optimizer,
               accelerator, buffers: BufferSnapshot, faults: StepFaults = NO_FAULTS,
               after_micro_batch: MicroBatchHook | None = None,
               before_update: Callable[[], object] | None = None) -> UpdateOutcome:
    """One update from the micro-batches of `window`: stepped, or skipped for non-finite gradients (the outcome may
    still be on the device). `before_update()` runs just before the optimizer step is launched, when this update's
    forward and backward passes are already queued on the device (the trainer settles the previous update there)."""
    loss_scale = window_loss_scale(criterion, window, accelerator)
    buffers.take()
    outcome = None
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
        if is_update_step and before_update is not None:
            before_update()
        step_started = time.perf_counter()
        outcome = strategy.step(model, optimizer, is_update_step)
        # a step decided on the host waited for the GPU's gradients; one that left its outcome on the device only
        # launched work (host time, not a wait)
        waited = 0.0 if outcome is not None and outcome.skipped is not None else time.perf_counter() - step_started
        if after_micro_batch is not None:
            after_micro_batch(batch, images, loss, waited)
    if outcome.skipped is not None:
        buffers.restore_where(outcome.skipped)  # on the device, whatever the outcome: no host sync
    elif not outcome.stepped():
        buffers.restore()
    return outcome


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
