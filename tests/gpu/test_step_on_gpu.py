"""The trainer's step on a GPU: what it says when its host, not the GPU, is the limit, and what
training.profile_steps writes (the GPU's kernels next to the host's operators)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from csi_dist.data.shards.writer import write_demo
from test_gpu_matrix import gpu_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs CUDA")]


def test_a_host_bound_run_says_so_and_its_profile_holds_the_gpu_kernels(tmp_path: Path):
    # a tiny CNN on tiny images: microseconds of GPU work per step, milliseconds of Python; npy shards, so the
    # loader (nothing to decode) is not the limit instead
    shards = tmp_path / "shards"
    write_demo(str(shards), n_images=300, image_size=32, seed=5, workers=2, image_format="npy")
    run_dir = tmp_path / "run"
    settings = [f"data.shard_dir={shards}", "model.model_arch=Tiny_CNN", "data.image_size=32",
                "training.batch_size=4", "data.num_workers=4", "training.max_steps=40", "training.log_every_steps=10",
                "training.profile_steps=5", "logging.wandb_mode=disabled", "training.n_epochs=1"]
    result = subprocess.run([sys.executable, "-m", "csi_dist.train", "--config", "configs/demo.ini", "--run-dir",
                             str(run_dir), *[arg for setting in settings for arg in ("--set", setting)]],
                            env=gpu_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "host-bound: the host waited on the GPU only" in result.stderr, result.stderr[-3000:]
    assert "set model.compile = true" in result.stderr and "data-bound" not in result.stderr
    summary = (run_dir / "profile" / "summary.txt").read_text()
    assert "over 5 optimizer step(s) after the first 10" in summary and "By GPU time:" in summary
    assert "cudaLaunchKernel" in summary  # the host's launches, beside the kernels they launched
