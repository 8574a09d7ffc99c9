"""What the trainer reports every `training.log_every_steps` updates: loss, learning rate, images/s, decode failures.

The loss is summed on the device and the decode failures on the host, so a step costs no host sync; a log line
costs one collective (loss and failures together) and one sync.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


class LogWindow:
    """One rank's sums since the last log line, and its undecodable samples of the whole epoch."""

    def __init__(self, accelerator, check_failures: Callable[[int], None]):
        self.accelerator = accelerator
        self.check_failures = check_failures  # raises TooManyBadSamples when the epoch's count is past the bound
        self.loss = torch.zeros((), device=accelerator.device)  # sum of the window means since the last line
        self.epoch_decode_failures = 0  # real samples only: padding copies are not counted
        self._restart()

    def _restart(self) -> None:
        self.loss.zero_()
        self.started, self.images, self.updates = time.perf_counter(), 0, 0

    def add_micro_batch(self, loss: torch.Tensor, batch: dict, images: torch.Tensor) -> None:
        self.loss += loss.detach()
        self.epoch_decode_failures += int((batch["decode_failed"] & ~batch["is_padding"]).sum())
        self.images += images.shape[0]

    def add_update(self) -> None:
        self.updates += 1

    def exclude(self, seconds: float) -> None:
        """Time that is not training (a checkpoint write) does not count against images/s."""
        self.started += seconds

    def emit(self, learning_rate: float) -> dict[str, float]:
        """The line's values (one collective), checked against data.max_bad_fraction; the window restarts."""
        world_size = self.accelerator.num_processes
        failures = torch.tensor(float(self.epoch_decode_failures), device=self.accelerator.device)
        loss_total, failures_total = self.accelerator.reduce(torch.stack([self.loss, failures]),
                                                             reduction="sum").tolist()
        self.check_failures(int(failures_total))
        values = {"train/loss": loss_total / world_size / self.updates, "train/lr": learning_rate,
                  "train/images_per_second": self.images * world_size / (time.perf_counter() - self.started),
                  "train/decode_failures": int(failures_total)}
        if self.accelerator.device.type == "cuda":
            values["train/peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self._restart()
        return values
