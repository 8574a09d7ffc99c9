"""Fitting the micro-batch to the GPU's memory (issue 18): the search over splits of the global batch and the probe
that leaves no trace. The real out-of-memory run is in tests/gpu (it needs CUDA)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from csi_dist.training.micro_batch import MicroBatchError, forward_backward_fits, largest_fitting_split


def no_autocast():
    return torch.autocast("cpu", enabled=False)


class RunsOutOfMemoryAbove(nn.Module):
    """A small BatchNorm model that fails like CUDA's allocator for batches above `limit` images."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 30)
        self.calls: list[int] = []

    def forward(self, images):
        self.calls.append(len(images))
        hidden = self.features(images)
        if len(images) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1.00 GiB free)")
        return self.head(hidden).view(-1, 6, 5)


def test_the_largest_split_that_fits_keeps_the_global_batch():
    model = RunsOutOfMemoryAbove(limit=20)
    fits = forward_backward_fits(model, (3, 16, 16), torch.device("cpu"), no_autocast, channels_last=False)
    micro_batch, accumulation = largest_fitting_split(global_batch=256, world_size=2, max_micro_batch=128, fits=fits)
    # the splits of 128 images per process, largest first: 128, 64, 32 fail; 16 is the largest at most 20
    assert (micro_batch, accumulation) == (16, 8)
    assert model.calls == [128, 64, 32, 16]
    assert 2 * micro_batch * accumulation == 256


def test_the_probe_leaves_no_trace_in_the_model():
    torch.manual_seed(0)
    model = RunsOutOfMemoryAbove(limit=4)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    fits = forward_backward_fits(model, (3, 16, 16), torch.device("cpu"), no_autocast, channels_last=False)
    assert fits(4) and not fits(8)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # BatchNorm statistics restored
    assert all(parameter.grad is None for parameter in model.parameters())


def test_an_error_that_is_not_out_of_memory_is_raised_not_taken_for_one():
    broken = nn.Conv2d(5, 1, 3)  # expects 5 channels: a RuntimeError that is not out-of-memory
    fits = forward_backward_fits(broken, (3, 16, 16), torch.device("cpu"), no_autocast, channels_last=False)
    with pytest.raises(RuntimeError, match="channels"):
        fits(2)


def test_when_not_even_one_image_fits_the_error_says_what_to_do():
    with pytest.raises(MicroBatchError, match="fsdp2.*image_size"):
        largest_fitting_split(global_batch=8, world_size=1, max_micro_batch=8, fits=lambda micro_batch: False)
