"""A micro-batch too large for the GPU (a real CUDA out-of-memory, forced by capping the process's memory) is made
smaller, and accumulation keeps the global batch: the run trains like the one whose GPU held the whole batch."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from csi_dist.data.shards.reader import open_split
from test_gpu_matrix import BF16_LOSS_RTOL, BF16_UPDATE_REL_L2, gpu_env, gpu_shards, scalars  # noqa: F401 - fixture
from test_parity import train_runs, training_differences

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs CUDA")]

GLOBAL_BATCH, MEMORY_CAP_GIB = 256, 8


def test_a_micro_batch_that_does_not_fit_is_split_and_the_global_batch_kept(gpu_shards, tmp_path: Path):
    # LayerNorm, no BatchNorm and no dropout: the same global batch then means the same update, however it is split
    settings = [f"data.shard_dir={gpu_shards}", "model.model_arch=convnext_tiny", "data.image_size=224",
                "data.augment=false", "model.dropout_rate=0", "training.mixed_precision=bf16",
                f"training.global_batch_size={GLOBAL_BATCH}", f"training.batch_size={GLOBAL_BATCH}",
                "training.n_epochs=1", "training.log_every_steps=1", "training.num_workers=4",
                "optimization.optimizer=sgd", "optimization.learning_rate=0.05", "logging.wandb_mode=disabled"]
    assert train_runs(1, tmp_path, settings, {"whole": ""}, timeout=600, env=gpu_env()) == {"whole": 0}
    assert train_runs(1, tmp_path, settings, {"capped": ""}, timeout=600,
                      env=gpu_env(CSI_FAULT_GPU_MEMORY_GIB=str(MEMORY_CAP_GIB))) == {"capped": 0}
    whole_log, capped_log = ((tmp_path / f"statuses-{n}.log").read_text() for n in (0, 1))

    assert "did not fit" not in whole_log
    assert f"global batch {GLOBAL_BATCH} = 1 process(es) x micro-batch {GLOBAL_BATCH} x 1 accumulation" in whole_log
    fitted = re.search(r"micro-batch (\d+) per process did not fit in GPU memory: training micro-batch (\d+) x "
                       rf"(\d+) accumulation step\(s\) x 1 process\(es\), the same global batch of {GLOBAL_BATCH}",
                       capped_log)
    assert fitted, capped_log[-4000:]
    micro_batch, accumulation = int(fitted.group(2)), int(fitted.group(3))
    assert micro_batch < GLOBAL_BATCH and micro_batch * accumulation == GLOBAL_BATCH
    assert "a micro-batch of 256 image(s) does not fit in the GPU's memory: CUDA out of memory" in capped_log

    updates = math.ceil(open_split(str(gpu_shards), "train").num_samples / GLOBAL_BATCH)
    for name in ("whole", "capped"):
        state = json.loads((tmp_path / name / "checkpoints" / f"step-{updates:08d}" / "trainer_state.json").read_text())
        assert state["global_step"] == updates and state["epoch"] == 1
    assert max(scalars(tmp_path / "capped", "train/peak_gpu_memory_gib")) <= MEMORY_CAP_GIB
    differences = training_differences(tmp_path / "capped", tmp_path / "whole")
    assert differences["loss_rel"] <= BF16_LOSS_RTOL and differences["update_rel_l2"] <= BF16_UPDATE_REL_L2, \
        differences
    print(f"micro-batch fitted under {MEMORY_CAP_GIB} GiB: {micro_batch} x {accumulation}; {differences}")
