"""What the trainer reports every `training.log_every_steps` updates: loss, learning rate, images/s, decode failures,
and where the time went: waiting on the loader (with what to do when that share is large), waiting on the device,
and the rest, the host's own work.

The loss is summed on the device and the decode failures on the host, so a step costs no host sync; a log line
costs one collective (loss, failures and waits together) and no sync: its numbers are read when the next line is
due (or at the epoch's end), so each line is written one window late, under its own step. Time blocked on the
loader is time the GPU had nothing new to do; time blocked on the device is the host waiting for the GPU to reach an
update (reading its outcome one update later, training/step.py, or inside `strategy.step` where the strategy decides
on the host); what is left is the host's own work (Python, kernel launches; the launch of an optimizer step that
leaves its outcome on the device too). A host that hardly ever waits for the GPU is what keeps
the GPU waiting: the step is host-bound, and the message says so once per epoch, as it does for a data-bound one.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from csi_dist.training.host_copy import HostCopy

DATA_BOUND_SHARE = 0.1  # waiting on the loader more than this share of a window is worth saying
HOST_BOUND_DEVICE_WAIT = 0.05  # on a GPU, a host that waited on it less than this share of a window kept it waiting


def data_bound_message(wait_share: float, loader_rate: float, step_rate: float, advice: str) -> str | None:
    """The plain sentence for a window that waited on its data, or None when it hardly did."""
    if wait_share <= DATA_BOUND_SHARE:
        return None
    return (f"data-bound: the step waited on the loader {wait_share:.0%} of the time; the loader gave "
            f"{loader_rate:.0f} img/s, the step alone could do {step_rate:.0f} img/s: {advice}")


def host_bound_message(wait_share: float, device_share: float, advice: str) -> str | None:
    """The plain sentence for a GPU window whose host hardly ever waited for the GPU: the GPU then waits for the
    host (Python, kernel launches, the loop's own work) instead; None otherwise."""
    if wait_share > DATA_BOUND_SHARE or device_share >= HOST_BOUND_DEVICE_WAIT:
        return None
    return (f"host-bound: the host waited on the GPU only {device_share:.0%} of the time and on the loader "
            f"{wait_share:.0%}: the GPU waits for the host to launch its work: {advice}")


class LogWindow:
    """One rank's sums since the last log line, and its undecodable samples of the whole epoch."""

    def __init__(self, accelerator, check_failures: Callable[[int], None], advice: str = "", host_advice: str = ""):
        self.accelerator = accelerator
        self.check_failures = check_failures  # raises TooManyBadSamples when the epoch's count is past the bound
        self.advice = advice  # what would feed the step faster here (the data-bound message's last part)
        self.host_advice = host_advice  # what would take work off the host (the host-bound message's)
        self.loss = torch.zeros((), device=accelerator.device)  # sum of the window means since the last line
        self.epoch_decode_failures = 0  # real samples only: padding copies are not counted
        self.bound_message_said = False  # the message once per epoch; the share goes to the tracker every line
        self.pending: PendingLine | None = None  # the window closed last, its numbers still on the way
        self._restart()

    def _restart(self) -> None:
        self.loss.zero_()
        self.started, self.images, self.updates = time.perf_counter(), 0, 0
        self.data_wait = 0.0  # seconds blocked on the loader since the line before
        self.device_wait = 0.0  # seconds blocked until the GPU reached an update (strategy.step or its outcome)
        self.startup = 0.0  # the wait for the epoch's first batch (workers starting): not a steady-state wait

    def timed(self, batches: Iterable) -> Iterator:
        """`batches`, with the time spent waiting for each one added to the window."""
        iterator, first = iter(batches), True
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            waited = time.perf_counter() - asked
            if first:
                self.startup += waited
                first = False
            self.data_wait += waited
            yield batch

    def add_micro_batch(self, loss: torch.Tensor, batch: dict, images: torch.Tensor) -> None:
        self.loss += loss.detach()
        self.epoch_decode_failures += int((batch["decode_failed"] & ~batch["is_padding"]).sum())
        self.images += images.shape[0]

    def add_update(self) -> None:
        self.updates += 1

    def add_device_wait(self, seconds: float) -> None:
        self.device_wait += seconds

    def exclude(self, seconds: float) -> None:
        """Time that is not training (a checkpoint write) does not count against images/s."""
        self.started += seconds

    def emit(self, learning_rate: float, step: int) -> list[LogLine]:
        """Close this window and start the next; returns the lines whose numbers have reached the host: the window
        before this one (its collective and copy ran while the GPU went on), so a log line waits for nothing."""
        ready = self.flush()
        world_size = self.accelerator.num_processes
        elapsed = time.perf_counter() - self.started
        host = torch.tensor([float(self.epoch_decode_failures), self.data_wait - self.startup, self.startup,
                             self.device_wait], pin_memory=self.accelerator.device.type == "cuda")
        # into pinned memory and back without a wait: a tensor made from host numbers straight on the GPU would be
        # copied from pageable memory, which waits for the stream
        totals = torch.cat([self.loss[None], host.to(self.accelerator.device, non_blocking=True)])
        if world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        self.pending = PendingLine(step, learning_rate, elapsed, self.images * world_size, self.updates,
                                   HostCopy(totals))
        self._restart()
        return ready

    def flush(self) -> list[LogLine]:
        """The closed window's line, if one is pending (waits for the GPU to reach it)."""
        if self.pending is None:
            return []
        pending, self.pending = self.pending, None
        return [self._line(pending)]

    def _line(self, pending: PendingLine) -> LogLine:
        """A closed window's values, checked against data.max_bad_fraction, and the data- or host-bound message
        when this window shows one (the first time in the epoch)."""
        world_size = self.accelerator.num_processes
        totals = pending.totals.read().tolist()
        loss_total, failures_total = totals[0], totals[1]
        steady_wait, startup, device_wait = (total / world_size for total in totals[2:])
        self.check_failures(int(failures_total))
        images, elapsed = pending.images, pending.elapsed
        steady = max(elapsed - startup, 1e-9)  # ranks' mean; the epoch's worker start-up is not a data rate
        wait_share = min(max(steady_wait / steady, 0.0), 1.0)
        device_share = min(max(device_wait / steady, 0.0), 1.0 - wait_share)
        values = {"train/loss": loss_total / world_size / pending.updates, "train/lr": pending.learning_rate,
                  "train/images_per_second": images / elapsed, "train/data_wait_share": wait_share,
                  "train/device_wait_share": device_share, "train/host_share": 1.0 - wait_share - device_share,
                  "train/decode_failures": int(failures_total)}
        if self.accelerator.device.type == "cuda":
            values["train/peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        message = None
        if not self.bound_message_said:
            message = data_bound_message(wait_share, images / steady, images / max(steady - steady_wait, 1e-9),
                                         self.advice)
            if message is None and self.accelerator.device.type == "cuda":
                message = host_bound_message(wait_share, device_share, self.host_advice)
            self.bound_message_said = message is not None
        return LogLine(pending.step, values, message)


@dataclass(frozen=True)
class PendingLine:
    step: int
    learning_rate: float
    elapsed: float
    images: int  # over all ranks
    updates: int
    totals: HostCopy  # loss, decode failures, data wait, startup wait, device wait: summed over ranks


@dataclass(frozen=True)
class LogLine:
    step: int  # the optimizer step the window ended at
    values: dict[str, float]
    message: str | None  # the data- or host-bound sentence, at most once per epoch
