"""Where images are finished (issue 19): uint8 pixels finished on the device equal the workers' float images, the
batched augmentation is torchvision's affine per image, raw .npy shards equal PNG ones, and a trainer that waits on
its data says so."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from conftest import REPO_ROOT, subprocess_env
from csi_dist.data.shards.reader import LoaderSettings, build_loader, finish_on_device, open_split
from csi_dist.data.shards.writer import write_demo
from csi_dist.data.transforms import DecodeError, augment_batch, augment_draws, decode_array
from csi_dist.core.faults import SLOW_BATCH_VARIABLE


def torchvision_augment(image: torch.Tensor, draws: list[float]) -> torch.Tensor:
    """The per-image augmentation written with torchvision's affine: the independent reference."""
    size = image.shape[-1]
    moved = TF.affine(image, angle=(draws[0] * 2 - 1) * 7.0, scale=1.0 + (draws[1] * 2 - 1) * 0.08,
                      translate=[round((draws[2] * 2 - 1) * 0.04 * size), round((draws[3] * 2 - 1) * 0.04 * size)],
                      shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR)
    return (moved * (1.0 + (draws[4] * 2 - 1) * 0.1) + (draws[5] * 2 - 1) * 0.05).clamp(0.0, 1.0)


def test_the_batched_augmentation_is_torchvisions_affine_of_each_image():
    torch.manual_seed(0)
    images = torch.rand(24, 1, 40, 40)
    draws = torch.stack([augment_draws(seed=3, epoch=1, position=position) for position in range(24)])
    expected = torch.stack([torchvision_augment(image, row) for image, row in zip(images, draws.tolist())])
    assert torch.allclose(augment_batch(images.clone(), draws), expected, atol=1e-6)
    assert not torch.allclose(expected, images, atol=1e-2)  # the draws really move the images


def test_pixels_finished_where_the_batch_goes_equal_the_workers_images(phantom_shards: Path):
    """The same batches, images finished in the workers or (data.gpu_augment) after the move: same samples, same
    augmentation, same values; the workers then hand over a quarter of the bytes."""
    workers = LoaderSettings(batch_size=8, image_size=32, augment=True, shuffle=True, shuffle_window=16, seed=5,
                             num_workers=2)
    on_device = dataclasses.replace(workers, finish_on_device=True)
    shard_set = open_split(phantom_shards, "train")
    finished = list(build_loader(shard_set, workers, epoch=1, rank=0, world_size=1))
    raw = list(build_loader(shard_set, on_device, epoch=1, rank=0, world_size=1))
    assert len(finished) == len(raw) > 2
    for worker_batch, raw_batch in zip(finished, raw):
        assert "image" not in raw_batch and raw_batch["pixels"].dtype == torch.uint8
        assert torch.equal(worker_batch["sample_index"], raw_batch["sample_index"])
        assert torch.equal(finish_on_device(raw_batch, torch.device("cpu")), worker_batch["image"])


def test_npy_shards_give_the_pngs_pixels(tmp_path: Path):
    png = write_demo(tmp_path / "png", n_images=24, image_size=32, seed=4, workers=1)
    npy = write_demo(tmp_path / "npy", n_images=24, image_size=32, seed=4, workers=1, image_format="npy")
    assert (png["image_format"], npy["image_format"]) == ("png", "npy")
    settings = LoaderSettings(batch_size=4, image_size=32, augment=True, seed=1)
    for first, second in zip(build_loader(open_split(tmp_path / "png", "train"), settings, epoch=0, rank=0,
                                          world_size=1),
                             build_loader(open_split(tmp_path / "npy", "train"), settings, epoch=0, rank=0,
                                          world_size=1), strict=True):
        assert first["file_id"] == second["file_id"] and torch.equal(first["image"], second["image"])


def test_a_damaged_array_is_a_decode_error_naming_what_it_holds():
    with pytest.raises(DecodeError, match="not a .npy array"):
        decode_array(b"\x93NUMPY garbage", 16)
    buffer = __import__("io").BytesIO()
    np.save(buffer, np.zeros((16, 16), dtype=np.float32))
    with pytest.raises(DecodeError, match="uint8 array, got float32"):
        decode_array(buffer.getvalue(), 16)


@pytest.mark.slow
def test_a_trainer_waiting_on_its_data_says_so_and_logs_the_share(phantom_shards: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "csi_dist.train", "--config", "configs/demo.ini", "--run-dir", str(run_dir),
         "--set", f"data.shard_dir={phantom_shards}", "--set", "data.image_size=32", "--set", "training.batch_size=8",
         "--set", "training.num_workers=1", "--set", "model.model_arch=Tiny_CNN", "--set", "training.max_steps=12",
         "--set", "training.log_every_steps=4",
         "--set", "logging.wandb_mode=disabled"],
        env=subprocess_env(**{SLOW_BATCH_VARIABLE: "0.8"}), cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data-bound: the step waited on the loader" in result.stderr
    assert "raise data.num_workers (now 1)" in result.stderr
    assert result.stderr.count("data-bound") == 1  # once per epoch, not every log line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    shares = [event.value for event in events.Scalars("train/data_wait_share")]
    # the worker's 4 prefetched batches hide the first steps' waits; by the last window the loader's 0.8 s per
    # batch is all the step waits on (a step of a 32 px Custom_1 takes well under 0.4 s even on a loaded CPU)
    assert len(shares) == 3 and shares[-1] > 0.5, shares
    for step in range(3):  # the window's time, split three ways
        parts = [events.Scalars(tag)[step].value for tag in ("train/data_wait_share", "train/device_wait_share",
                                                             "train/host_share")]
        assert min(parts) >= 0.0 and sum(parts) == pytest.approx(1.0, abs=1e-6), parts
