"""Batches moved to the device: the side-stream copy on CUDA gives the same tensors, in order, as a plain copy."""
import pytest
import torch

from csi_dist.evaluation.inference import device_batches, move_batch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def host_batches(count: int, batch_size: int = 4, size: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        batch = {"image": torch.rand(batch_size, 1, size, size, generator=generator),
                 "zones": torch.randint(0, 5, (batch_size, 6), generator=generator),
                 "is_padding": torch.rand(batch_size, generator=generator) < 0.3,
                 "decode_failed": torch.rand(batch_size, generator=generator) < 0.2}
        if torch.cuda.is_available():
            batch = {key: value.pin_memory() for key, value in batch.items()}
        batches.append(batch)
    return batches


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_device_batches_equal_a_plain_copy_in_order(device_name, channels_last):
    device = torch.device(device_name)
    batches = host_batches(5)
    moved = list(device_batches(iter(batches), device, channels_last))
    assert len(moved) == len(batches)
    for (host, images, zone_targets, sample_mask), original in zip(moved, batches):
        assert host is original  # the host batch comes along (decode counters are read from it)
        expected = move_batch(original, device, channels_last)
        for got, want in zip((images, zone_targets, sample_mask), expected):
            assert got.device.type == device.type and got.dtype == want.dtype
            assert torch.equal(got, want)


def test_an_empty_loader_yields_nothing():
    assert list(device_batches(iter([]), torch.device(DEVICES[-1]), False)) == []
