"""GPU tier (skipped without CUDA): the documented launch, `python -m csi_dist.launcher` with the shipped DDP and
ZeRO-3 configs on the GPUs present (2 of them, or 1 on a 1-GPU host: a 1-process launch still goes through the
launcher and the config's strategy), ends a notice to its whole process group the way the ranks did: every rank
saves, exit 75, one line on how to resume, no traceback. `accelerate launch` ends the same runs with exit 1 and
torch's SignalException (H200, issue 30)."""
from __future__ import annotations

import signal

import pytest
import torch

from test_gpu_matrix import gpu_env
from test_launch import LAUNCH, assert_saved_and_ended_75_with_one_resume_line, notice_once_training, start_launch

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs CUDA")]

STRATEGY_LINE = {"ddp.yaml": "DDP over {n} process(es)",
                 "deepspeed_zero3.yaml": "DeepSpeed ZeRO-3 over {n} process(es)"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
@pytest.mark.parametrize("config_file", list(STRATEGY_LINE))
def test_a_notice_to_the_documented_gpu_launch_checkpoints_and_exits_75(phantom_shards, tmp_path, config_file,
                                                                         signum):
    processes = min(2, torch.cuda.device_count())
    run_dir = tmp_path / "run"
    process = start_launch(LAUNCH, f"launch/accelerate/{config_file}", processes, run_dir, phantom_shards,
                           gpu_env(CSI_REQUEUE="0"), "training.mixed_precision=bf16")
    stderr = notice_once_training(process, run_dir, signum)
    # what really ran: the config's strategy, on the GPUs
    assert STRATEGY_LINE[config_file].format(n=processes) in stderr, stderr[-3000:]
    assert "process(es) on cuda:0" in stderr, stderr[-3000:]
    assert_saved_and_ended_75_with_one_resume_line(process.returncode, stderr, run_dir, signum, ranks=processes)
