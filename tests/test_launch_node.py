"""A SLURM node's ranks, without SLURM: the command slurm/launch_node.sh builds starts them through csi_dist.launcher,
the strategy of the accelerate config named by CSI_ACCELERATE_CONFIG reaches them (a `--multi_gpu` next to an FSDP or
DeepSpeed file made accelerate's parser train them DDP, silently), and a rank that saved on a notice ends with 75 even
when the SIGTERM of its own job's requeue reaches it on the way out (the status train.sbatch decides on)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, subprocess_env
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.launcher import parse_launch, rank_environments

STRATEGY_CONFIGS = sorted(path.name for path in (REPO_ROOT / "launch" / "accelerate").glob("*.yaml")
                          if yaml.safe_load(path.read_text())["distributed_type"] in ("FSDP", "DEEPSPEED"))


def node_launch_argv(tmp_path: Path, **environment: str) -> list[str]:
    """The arguments launch_node.sh hands CSI_PYTHON: a stand-in python that records them."""
    recorder, recorded = tmp_path / "python", tmp_path / "argv"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > "{recorded}"\n')
    recorder.chmod(0o755)
    env = {key: value for key, value in subprocess_env().items()
           if not key.startswith("SLURM_") and key not in ("CUDA_VISIBLE_DEVICES", "CSI_ACCELERATE_CONFIG")}
    env.update(CSI_PYTHON=str(recorder), CSI_REPO=str(REPO_ROOT), **environment)
    subprocess.run(["bash", str(REPO_ROOT / "slurm" / "launch_node.sh"), "--config", "configs/demo.ini"],
                   env=env, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    return recorded.read_text().split("\0")[:-1]


@pytest.mark.parametrize("config", STRATEGY_CONFIGS)
def test_the_accelerate_config_strategy_reaches_the_ranks_of_a_slurm_node(tmp_path, monkeypatch, config):
    """Node 1 of a 2-node CPU job, 2 processes per node: the ranks this node starts get the file's strategy
    (read here from the yaml itself), and the job's layout and rendezvous in place of the file's counts."""
    config_path = REPO_ROOT / "launch" / "accelerate" / config
    argv = node_launch_argv(tmp_path, CSI_ACCELERATE_CONFIG=str(config_path), SLURM_JOB_NUM_NODES="2",
                            SLURM_NODEID="1", CSI_CPU_PROCS_PER_NODE="2", CSI_MAIN_ADDR="n1", CSI_MAIN_PORT="20123")
    assert argv[:2] == ["-m", "csi_dist.launcher"], argv  # the launcher that ends with the ranks' status
    assert argv[-4:] == ["-m", "csi_dist.train", "--config", "configs/demo.ini"], argv
    monkeypatch.chdir(REPO_ROOT)
    environments = rank_environments(parse_launch(argv[2:]))

    written = yaml.safe_load(config_path.read_text())
    if written["distributed_type"] == "DEEPSPEED":
        expected = {"ACCELERATE_USE_DEEPSPEED": "true",
                    "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(written["deepspeed_config"]["zero_stage"])}
    else:
        expected = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(written["fsdp_config"]["fsdp_version"])}
    strategy_keys = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP",
                     "FSDP_VERSION")
    assert [{key: rank[key] for key in strategy_keys if key in rank} for rank in environments] == [expected] * 2
    assert [(rank["RANK"], rank["LOCAL_RANK"], rank["WORLD_SIZE"], rank["MASTER_ADDR"], rank["MASTER_PORT"])
            for rank in environments] == [("2", "0", "4", "n1", "20123"), ("3", "1", "4", "n1", "20123")]


def test_without_a_config_file_a_node_of_several_trains_ddp(tmp_path, monkeypatch):
    argv = node_launch_argv(tmp_path, SLURM_JOB_NUM_NODES="2", SLURM_NODEID="0", CSI_MAIN_ADDR="n1",
                            CSI_MAIN_PORT="20123")
    assert argv[:2] == ["-m", "csi_dist.launcher"] and "--multi_gpu" in argv, argv
    monkeypatch.chdir(REPO_ROOT)
    arguments = parse_launch(argv[2:])
    assert (arguments.multi_gpu, arguments.use_fsdp, arguments.use_deepspeed, arguments.num_processes,
            arguments.machine_rank) == (True, False, False, 2, 0)


def test_a_rank_leaving_with_75_outlives_the_sigterm_its_requeue_brings(tmp_path):
    """Rank 0's `scontrol requeue` makes SLURM send SIGTERM to every process of the job, while the other ranks are
    leaving with 75. A flag-only handler is gone once the interpreter shuts down: the SIGTERM then killed a rank
    (status 143; srun's status, so train.sbatch took the notice for a lost rank and used up a failure requeue).
    Here the SIGTERM lands at the end of the interpreter's shutdown, every time."""
    rank = """
import os, signal, sys, time, types
sys.modules["csi_dist.core.distributed"] = types.SimpleNamespace(leave_process_group=lambda: None)  # no group here
from csi_dist.cluster.preemption import PreemptionWatcher

class Accelerator:  # a rank other than 0 (rank 0 would run scontrol), past the checkpoint every rank saved
    is_main_process = False
    wait_for_everyone = staticmethod(lambda: None)

class RequeueNotice:  # released with the module's globals, after the interpreter dropped its signal handlers
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)

late = RequeueNotice()
watcher = PreemptionWatcher(sys.argv[1])
watcher.install()
watcher.finish_after_checkpoint(Accelerator())
"""
    ended = subprocess.run([sys.executable, "-c", rank, str(tmp_path)], env=subprocess_env(), cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=60)
    assert ended.returncode == EXIT_PREEMPTED, (ended.returncode, ended.stderr[-2000:])
