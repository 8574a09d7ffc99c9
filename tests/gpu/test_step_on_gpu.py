"""The trainer's step on a GPU: what it says when its host, not the GPU, is the limit, and what
training.profile_steps writes (the GPU's kernels next to the host's operators)."""
from __future__ import annotations

import re
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
    # microseconds of kernels per step of milliseconds of Python: the idle report finds the GPU idle most of the step
    # (it printed nothing on a GPU while it looked for torch's step spans under the wrong name)
    idle = re.search(r"GPU idle: [\d.]+ ms of [\d.]+ ms per step \(([\d.]+)%\)", summary)
    assert idle and float(idle.group(1)) > 50.0, summary[:2000]


def test_the_step_its_outcome_and_a_log_line_make_no_host_sync():
    """torch's sync debug mode raises on any synchronising CUDA call (an .item(), a bool() of a GPU tensor, a copy to
    pageable memory): the trainer's step with a fused AdamW, BatchNorm restored on the device, the ledger reading the
    previous update's outcome (through an event, which waits for that update only) and a log line must make none.
    The step as it was (a bool() of the gradient norm's finiteness each update) fails here."""
    from csi_dist.model.loss import WeightedCSILoss
    from csi_dist.training.accumulation import BufferSnapshot
    from csi_dist.training.log_window import LogWindow
    from csi_dist.training.step import SingleProcess, UpdateLedger, train_step
    from csi_dist.training.strategies import SingleProcessStrategy

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 30),
                                torch.nn.Unflatten(1, (6, 5))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    process, strategy, buffers = SingleProcess(device, torch.bfloat16), SingleProcessStrategy(1.0), BufferSnapshot(model)
    window = [(None, torch.randn(16, 1, 32, 32, device=device), torch.randint(0, 5, (16, 6), device=device),
               torch.ones(16, dtype=torch.bool, device=device))]
    host_batch = {"decode_failed": torch.zeros(16, dtype=torch.bool), "is_padding": torch.zeros(16, dtype=torch.bool)}
    steps = []
    ledger = UpdateLedger(on_stepped=lambda: steps.append("stepped"), on_skipped=lambda where: steps.append(where))
    log_window = LogWindow(process, check_failures=lambda failures: None)
    lines, criterion = [], WeightedCSILoss().to(device)
    # the first update creates the optimizer's state (a step count copied to the GPU): outside the checked steps
    ledger.record(train_step(model, window, criterion=criterion, strategy=strategy, optimizer=optimizer,
                             accelerator=process, buffers=buffers), 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 7):
            update = train_step(model, window, criterion=criterion, strategy=strategy,
                                optimizer=optimizer, accelerator=process, buffers=buffers, before_update=ledger.settle,
                                after_micro_batch=lambda batch, images, loss, seconds: log_window.add_micro_batch(
                                    loss, host_batch, images))
            ledger.record(update, step)
            log_window.add_update()
            if step % 3 == 0:
                lines += log_window.emit(learning_rate=1e-3, step=step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ledger.settle()
    lines += log_window.flush()
    assert steps == ["stepped"] * 7
    assert [line.step for line in lines] == [3, 6] and all(line.values["train/loss"] > 0 for line in lines)
