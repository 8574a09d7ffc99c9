"""Images finished on the GPU (data.gpu_augment, issue 19) equal those the loader workers finish on the CPU: the
same samples, the same augmentation draws, the same pixels up to float rounding."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from csi_dist.data.shards.reader import LoaderSettings, build_loader, finish_on_device, open_split
from test_gpu_matrix import gpu_shards  # noqa: F401 - fixture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs CUDA")]


def test_the_gpu_finishes_images_as_the_workers_do(gpu_shards: Path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)  # as the trainer runs (distributed.py)
    workers = LoaderSettings(batch_size=32, image_size=224, augment=True, shuffle=True, shuffle_window=64, seed=9,
                             num_workers=2)
    shard_set = open_split(gpu_shards, "train")
    on_cpu = build_loader(shard_set, workers, epoch=2, rank=0, world_size=1)
    on_gpu = build_loader(shard_set, dataclasses.replace(workers, finish_on_device=True), epoch=2, rank=0,
                          world_size=1, pin_memory=True)
    compared = 0
    for cpu_batch, raw_batch in zip(on_cpu, on_gpu, strict=True):
        assert torch.equal(cpu_batch["sample_index"], raw_batch["sample_index"])
        finished = finish_on_device(raw_batch, torch.device("cuda"))
        assert finished.is_cuda and finished.dtype == torch.float32
        difference = (finished.cpu() - cpu_batch["image"]).abs().max().item()
        assert difference <= 1e-4, f"batch of {compared}: max difference {difference}"  # 1/78 of a grey level
        compared += finished.shape[0]
    assert compared >= 200
