"""The largest micro-batch one GPU holds, found before training; accumulation makes up the rest of the global batch.

With `training.global_batch_size` set, `training.batch_size` is the largest micro-batch a process may run. On a GPU,
under DDP and ZeRO-1/2 (which keep the whole model on every GPU; FSDP2 and ZeRO-3 are not checked), the trainer
tries one forward and backward pass of that size (random images, the model before its strategy wraps it, with the
memory the optimizer state will take held aside); on CUDA out-of-memory it tries the next smaller split of the same
global batch, down to one image. All ranks then run the smallest micro-batch any of them fits, so the global
batches, their order and the exact-resume guarantee stay what they were: only the accumulation grows.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from csi_dist.training.accumulation import BatchPlan, split_global_batch

log = logging.getLogger(__name__)

ADAM_STATE_COPIES = 2  # exp_avg and exp_avg_sq: two fp32 copies of every parameter, allocated at the first update


class MicroBatchError(RuntimeError):
    """Not even one image per micro-batch fits in the GPU's memory."""


def largest_fitting_split(global_batch: int, world_size: int, max_micro_batch: int,
                          fits: Callable[[int], bool]) -> tuple[int, int]:
    """(micro-batch, accumulation) of `global_batch` on `world_size` processes: the largest micro-batch of at most
    `max_micro_batch` for which `fits(micro_batch)` holds (the splits are tried from the largest down)."""
    limit = max_micro_batch
    while limit >= 1:
        micro_batch, accumulation = split_global_batch(global_batch, world_size, limit)
        if fits(micro_batch):
            return micro_batch, accumulation
        limit = micro_batch - 1
    raise MicroBatchError(f"not even a micro-batch of 1 image fits in this GPU's memory (global batch "
                          f"{global_batch} on {world_size} processes): use a sharded strategy (training.strategy = "
                          f"fsdp2 or deepspeed with zero_stage 3), a smaller data.image_size or a smaller model")


def forward_backward_fits(model: torch.nn.Module, image_shape: tuple[int, int, int], device: torch.device, autocast,
                          channels_last: bool) -> Callable[[int], bool]:
    """A probe: does one training forward + backward of `micro_batch` random images fit, beside the optimizer state?

    The model's buffers (BatchNorm running statistics) and gradients are restored afterwards, and the random
    streams are only used before the trainer seeds its per-rank streams, so the probe leaves no trace in training.
    """
    parameter_bytes = sum(parameter.numel() * 4 for parameter in model.parameters() if parameter.requires_grad)

    def fits(micro_batch: int) -> bool:
        buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
        optimizer_state = images = loss = None
        try:
            optimizer_state = torch.empty(ADAM_STATE_COPIES * parameter_bytes, dtype=torch.uint8, device=device)
            images = torch.randn(micro_batch, *image_shape, device=device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            model.train()
            with autocast():
                loss = model(images).float().logsumexp(-1).mean()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return True
        except Exception as error:  # noqa: BLE001 - only out-of-memory is an answer; anything else is raised
            if not should_reduce_batch_size(error):
                raise
            log.warning("a micro-batch of %d image(s) does not fit in the GPU's memory: %s", micro_batch,
                        str(error).splitlines()[0][:160])
            return False
        finally:
            del optimizer_state, images, loss
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name])
            clear_device_cache(garbage_collection=True)

    return fits


def fit_micro_batch(plan: BatchPlan, global_batch_size: int, accelerator, fits: Callable[[int], bool]) -> BatchPlan:
    """The plan with the micro-batch every rank fits (the smallest of the ranks' answers) and the accumulation that
    keeps `global_batch_size` (training.global_batch_size, set: the trainer asks only then, and only on CUDA)."""
    world_size = plan.world_size
    try:
        micro_batch, _ = largest_fitting_split(global_batch_size, world_size, plan.micro_batch, fits)
    except MicroBatchError:
        micro_batch = 0  # the other ranks must still hear it
    every_rank = accelerator.gather(torch.tensor([micro_batch], device=accelerator.device))
    smallest = int(every_rank.min().item())
    if smallest == 0:
        raise MicroBatchError(f"not even a micro-batch of 1 image fits in the memory of one of the GPUs (global batch "
                              f"{global_batch_size} on {world_size} processes)")
    fitted = BatchPlan(world_size, *split_global_batch(global_batch_size, world_size, smallest))
    if fitted.micro_batch != plan.micro_batch:
        log.warning("micro-batch %d per process did not fit in GPU memory: training micro-batch %d x %d accumulation "
                    "step(s) x %d process(es), the same global batch of %d", plan.micro_batch, fitted.micro_batch,
                    fitted.accumulation, world_size, global_batch_size)
    return fitted
