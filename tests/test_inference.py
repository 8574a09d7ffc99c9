"""Batches moved to the device: every batch the shard plan assigns to the rank, in its order, with the model input
computed by hand from the stored uint8 pixels and the documented mean/std, and the right samples masked."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split
from csi_dist.data.shards.plan import plan_epoch
from csi_dist.evaluation.inference import device_batches
from shard_factory import write_shards

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZE = 8
SHARD_SIZES = [5, 6]  # 11 samples over 2 ranks x 3: the last position of rank 1 is padding
CORRUPT = 7  # rank 1 reads it at step 0: the sample index whose image cannot be decoded
# the config's normalisations as the config documents them (config.py: medical 0.5/0.5, imagenet grey mean/std)
MEAN_STD = {"medical": (0.5, 0.5), "imagenet": (0.449, 0.226)}


def stored_pixels(sample_index: int) -> np.ndarray:
    """The uint8 image written for a sample: a ramp no transpose, flip or other sample's image reproduces."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    return ((rows * 29 + cols * 3 + sample_index * 17) % 256).astype(np.uint8)


def zones_of(sample_index: int) -> list[int]:
    return [(sample_index + zone) % 5 for zone in range(6)]  # what shard_factory writes


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    def ramp(sample: dict) -> dict:
        index = int(sample["__key__"].split("-")[1])
        buffer = io.BytesIO()
        Image.fromarray(stored_pixels(index), mode="L").save(buffer, format="PNG")
        sample["png"] = b"not an image" if index == CORRUPT else buffer.getvalue()
        return sample

    return write_shards(tmp_path_factory.mktemp("inference") / "shards", {"train": SHARD_SIZES}, image_size=SIZE,
                        edit_sample=ramp)


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("normalization, finish_on_device", [("medical", False), ("imagenet", True)])
def test_device_batches_are_the_planned_samples_normalised_by_hand(shard_dir, device_name, channels_last,
                                                                    normalization, finish_on_device):
    check_device_batches(shard_dir, torch.device(device_name), channels_last, normalization, finish_on_device)


def check_device_batches(shard_dir, device: torch.device, channels_last: bool, normalization: str,
                         finish_on_device: bool) -> None:
    """Rank 1 of 2, shuffled: each moved batch must hold the samples the plan gives that step, in order."""
    settings = LoaderSettings(batch_size=3, image_size=SIZE, normalization=normalization, shuffle=True,
                              shuffle_window=4, seed=5, finish_on_device=finish_on_device)
    rank, world_size = 1, 2
    loader = build_loader(open_split(shard_dir, "train"), settings, epoch=1, rank=rank, world_size=world_size,
                          pin_memory=device.type == "cuda")
    plan = plan_epoch(SHARD_SIZES, epoch=1, seed=5, shuffle=True, shuffle_window=4, world_size=world_size,
                      batch_size=3, num_workers=0)
    mean, std = MEAN_STD[normalization]
    moved = list(device_batches(iter(loader), device, channels_last))
    assert len(moved) == plan.steps == 2
    padding_seen = order_seen = corrupt_seen = 0
    for step, (host, images, zone_targets, sample_mask) in enumerate(moved):
        planned = [plan.sample_at(position) for position in plan.batch_positions(step, rank)]
        indexes = [sum(SHARD_SIZES[:shard]) + index for shard, index, _ in planned]
        padding = [is_padding for _, _, is_padding in planned]
        assert host["sample_index"].tolist() == indexes  # the host batch travels with its own tensors
        for tensor in (images, zone_targets, sample_mask):
            assert tensor.device.type == device.type
        assert images.dtype == torch.float32 and images.shape == (3, 1, SIZE, SIZE)
        expected = torch.from_numpy(np.stack([np.zeros((SIZE, SIZE), np.uint8) if index == CORRUPT else
                                              stored_pixels(index) for index in indexes]))[:, None]
        expected = (expected.double() / 255 - mean) / std
        assert torch.allclose(images.cpu().double(), expected, atol=1e-5, rtol=0), (step, indexes)
        corrupt = [index == CORRUPT for index in indexes]
        assert zone_targets.cpu().tolist() == [[4] * 6 if bad else zones_of(index)
                                               for index, bad in zip(indexes, corrupt)]
        assert sample_mask.cpu().tolist() == [not pad and not bad for pad, bad in zip(padding, corrupt)]
        padding_seen += sum(padding)
        order_seen += indexes != sorted(indexes)
        corrupt_seen += sum(corrupt)
    assert padding_seen == corrupt_seen == 1 and order_seen  # the layout has padding, a failed decode, a shuffle


def test_an_empty_loader_yields_nothing():
    assert list(device_batches(iter([]), torch.device(DEVICES[-1]), False)) == []
