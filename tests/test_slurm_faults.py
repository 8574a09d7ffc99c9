"""A rank of a 2-node SLURM job killed, twice (the SLURM half of tests/test_faults.py, which owns the reference run).

In a file of its own because the tests that drive the SLURM cluster (tests/test_slurm*.py) share one pytest-xdist
worker (tests/conftest.py).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from conftest import REPO_ROOT, subprocess_env
from csi_dist.training.checkpoint_files import latest_checkpoint
from slurm_helpers import cluster_problem, differing_tensors, job_field, sbatch, wait_for_job_end
from test_faults import reference, shards, step_of, trainer_args, wait_for  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    if problem := cluster_problem():
        pytest.skip(problem)


def rank_process(run_dir: Path, rank: int) -> psutil.Process | None:
    """The trainer process of `rank` of the run in `run_dir` (not its launcher), once it has started."""
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if "csi_dist.train" not in command or str(run_dir) not in command or "csi_dist.launcher" in command:
            continue
        try:
            if process.environ().get("RANK") == str(rank):
                return process
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_job_whose_rank_is_killed_requeues_itself_and_ends_bit_identical(shards, reference, tmp_path):
    """With data-loader workers on, SLURM's SIGTERM to the step (--kill-on-bad-exit) used to kill the survivor's own
    requeue call: the job ended FAILED. The batch script now takes the decision after the step. One job loses a rank
    twice: first node 1's rank alone, then, in the requeued segment, node 1's launcher (csi_dist.launcher) and its rank
    together (a node going away). Both failures requeue it, and it ends with the uninterrupted run's weights."""
    workers = 2
    run_dir = tmp_path / "run"
    job_id = sbatch(REPO_ROOT / "slurm" / "train.sbatch",
                    ["--nodes=2", "--job-name=rank-lost", f"--output={tmp_path}/%x-%j.out"],
                    [*trainer_args(shards, run_dir)[2:], "--set", f"training.num_workers={workers}"], cwd=REPO_ROOT,
                    env=subprocess_env(CSI_REPO=str(REPO_ROOT)))
    log = tmp_path / f"rank-lost-{job_id}.out"
    first_victim = None
    try:
        for segment, after_step in enumerate((3, None)):
            if after_step is None:  # the requeued segment has trained 3 steps past where the first one died
                after_step = step_of(latest_checkpoint(run_dir)) + 3
            wait_for(lambda: (c := latest_checkpoint(run_dir)) is not None and step_of(c) >= after_step
                     and (victim := rank_process(run_dir, 1)) is not None and victim != first_victim, 240,
                     f"segment {segment} of the job to train to step {after_step}", interval=0.2)
            victim = rank_process(run_dir, 1)
            if segment == 1:
                launcher = victim.parent()
                assert "csi_dist.launcher" in " ".join(launcher.cmdline()), launcher.cmdline()
                os.kill(launcher.pid, signal.SIGKILL)
            os.kill(victim.pid, signal.SIGKILL)  # as the OOM killer or a crashing node would
            first_victim = victim
        state = wait_for_job_end(job_id, 240)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job_id} {state}:\n{text[-4000:]}"
    assert job_field(job_id, "Restarts") == "2"
    assert text.count("lost contact with another rank") >= 2, text[-4000:]
    # node 1's launcher names the rank it lost by its global rank
    assert "rank 1 was the first to fail, with exit status 137 (killed by SIGKILL)" in text, text[-4000:]
    for failure in (1, 2):
        assert f"requeueing SLURM job {job_id} after the failure ({failure} of at most 3)" in text, text[-4000:]
    assert len(re.findall(r"resumed from \S*step-\d{8}", text)) == 2, text[-4000:]
    # 2 nodes x 1 process: the same ranks and global batch as the 2-process reference
    assert differing_tensors(run_dir / "weights" / "last.safetensors", reference / "weights" / "last.safetensors") == []
