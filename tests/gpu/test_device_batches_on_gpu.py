"""The side-stream copy of `device_batches` (CUDA only): every planned batch, in order, normalised as by hand."""
from __future__ import annotations

import pytest
import torch

from test_inference import check_device_batches, shard_dir  # noqa: F401 - fixture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs CUDA")]


@pytest.mark.parametrize("normalization, finish_on_device", [("medical", False), ("imagenet", True)])
def test_the_side_stream_copy_gives_the_planned_batches_normalised_by_hand(shard_dir, normalization,  # noqa: F811
                                                                           finish_on_device):
    check_device_batches(shard_dir, torch.device("cuda"), True, normalization, finish_on_device)
