"""Sweeps on the local SLURM cluster: a killed driver, a preempted trial, a trial whose job dies (the SLURM half of
tests/test_sweep.py, whose helpers these tests use).

In a file of its own because the tests that drive the SLURM cluster (tests/test_slurm*.py) share one pytest-xdist
worker (tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO_ROOT, subprocess_env
from csi_dist.core.faults import SLOW_BATCH_VARIABLE
from csi_dist.tuning.study import SweepSettings, finished_count
from slurm_helpers import cluster_problem, wait_until
from test_jobs import job_parts
from test_sweep import (SWEEP_TIMEOUT_S, assert_best_params_reproduce, assert_sweep_outputs, run_sweep, study_trials,
                        sweep_command)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    if problem := cluster_problem():
        pytest.skip(problem)


@pytest.mark.slow
def test_slurm_sweep_survives_a_killed_driver_prunes_and_writes_reproducible_best_params(phantom_shards, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(phantom_shards, sweep_dir, n_trials=6, parallel=2, executor="slurm")
    driver = subprocess.Popen(command, env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: (sweep_dir / "sweep.json").exists() and
                   finished_count(study_trials(sweep_dir)) >= 1, SWEEP_TIMEOUT_S, "a first finished trial", interval=1)
    finally:
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies without warning; the trial jobs go on
        driver.wait(timeout=30)
    jobs_before = json.loads((sweep_dir / "jobs.json").read_text())
    try:
        run_sweep(command)  # the same command continues the same study
    except BaseException:
        cancel_sweep_jobs(sweep_dir)
        raise
    trials = assert_sweep_outputs(sweep_dir, 6)
    assert json.loads((sweep_dir / "jobs.json").read_text()) == jobs_before, "the restarted driver resubmitted jobs"
    assert optuna.study.get_all_study_names(load_study_storage(sweep_dir)) == [sweep_dir.name]
    assert sum(t.state == TrialState.PRUNED for t in trials) >= 1
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 1
    assert all(t.user_attrs["owner"].startswith("slurm-") for t in trials)
    assert_best_params_reproduce(sweep_dir, phantom_shards, tmp_path)


def cancel_sweep_jobs(sweep_dir: Path) -> None:
    """After a failed test: cancel exactly this sweep's jobs (other tests may share the cluster)."""
    jobs_file = sweep_dir / "jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else []
    ids = [job["owner"].removeprefix("slurm-") for job in jobs]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def start_driver(command: list[str], slow_batch_s: float = 0.0) -> subprocess.Popen:
    """`slow_batch_s`: each loader batch of the trials held back (csi_dist/core/faults.py), so that a signal sent after
    the first checkpoint lands before a Tiny_CNN trial has run its 45 steps to the end."""
    return subprocess.Popen(command, env=subprocess_env(**{SLOW_BATCH_VARIABLE: str(slow_batch_s)}), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def end_driver_if_running(driver: subprocess.Popen, sweep_dir: Path) -> None:
    """After a failed test: the driver and its trial jobs must not outlive it."""
    if driver.poll() is None:
        os.kill(driver.pid, signal.SIGKILL)
        cancel_sweep_jobs(sweep_dir)


def wait_for_first_complete_checkpoint(trial_dir: Path) -> None:
    """A kill must not land while the first checkpoint is still a .partial directory: nothing to resume then."""
    checkpoints = trial_dir / "checkpoints"
    wait_until(lambda: checkpoints.is_dir() and any(re.fullmatch(r"step-\d{8}", path.name)
                                                    for path in checkpoints.iterdir()),
               SWEEP_TIMEOUT_S, "the trial's first complete checkpoint")


def load_study_storage(sweep_dir: Path):
    from csi_dist.tuning.study import open_storage
    return open_storage(SweepSettings.load(sweep_dir))


@pytest.mark.slow
@pytest.mark.parametrize("notice", ["USR2 to the steps", "USR1 to the batch shell"])
def test_slurm_preempted_trial_is_requeued_and_resumes_from_its_checkpoint(phantom_shards, tmp_path, notice):
    """submitit's USR2 to the trial's ranks, and the notice of every csi_dist job (csi_dist/cluster/jobs.py: USR1 to
    the batch shell, whose trap writes the job's request file under the sweep dir, read by the trial's watcher)."""
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(phantom_shards, sweep_dir, n_trials=1, parallel=1, executor="slurm")
    command += ["--set", "callbacks.preemption_check_every_steps=1"]
    driver = start_driver(command, slow_batch_s=0.15)
    try:
        wait_for_first_complete_checkpoint(sweep_dir / "trials" / "trial-0000")
        job = json.loads((sweep_dir / "jobs.json").read_text())[0]["owner"].removeprefix("slurm-")
        # Slurm's preemption notice. The requeued job starts again on its own, cred_expire + 1 s later: a start
        # forced at once ("scontrol update StartTime=now") lands in the same second as the old credential's revocation
        # and Slurm kills the job ("Job credential revoked"), a real death the driver then retries as one.
        subprocess.run(["scancel", *(["--signal=USR2"] if notice == "USR2 to the steps" else
                                     ["--batch", "--signal=USR1"]), job], check=True, timeout=30)
        output, _ = driver.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        end_driver_if_running(driver, sweep_dir)
    assert driver.returncode == 0, output[-4000:]
    [trial] = study_trials(sweep_dir)
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["requeues"] == 1
    assert sorted(trial.intermediate_values) == [0, 1, 2]
    log = "".join(path.read_text() for path in (sweep_dir / "submitit").rglob("*_log.err"))
    assert "resumes its trial 0" in log and "resumed from" in log
    # the trial job's batch script has train.sbatch's notice and requeue, and its teardown without a run dir
    sbatch = job_parts((REPO_ROOT / "slurm" / "train.sbatch").read_text())
    [script] = (sweep_dir / "submitit").rglob("*_submission.sh")
    trial_job = job_parts(script.read_text())
    assert trial_job["options"] == sbatch["options"] and trial_job["notice"] == sbatch["notice"]
    assert trial_job["teardown"] == [line.replace(' "$run_dir"', "") for line in sbatch["teardown"]]


@pytest.mark.slow
def test_slurm_trial_whose_job_dies_is_failed_and_retried_from_its_checkpoints(phantom_shards, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(phantom_shards, sweep_dir, n_trials=1, parallel=1, executor="slurm")
    command[command.index("--dead-grace-s") + 1] = "5"
    driver = start_driver(command, slow_batch_s=0.15)
    try:
        wait_for_first_complete_checkpoint(sweep_dir / "trials" / "trial-0000")
        marker = f"submitit.core._submit {sweep_dir}"
        ps = subprocess.run(["ps", "-ww", "-eo", "pid=,comm=,args="], capture_output=True, text=True, timeout=30).stdout
        [pid] = [int(line.split()[0]) for line in ps.splitlines() if marker in line and line.split()[1] != "srun"]
        os.kill(pid, signal.SIGKILL)  # the trial process dies without a word: no tell, no requeue
        output, _ = driver.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        end_driver_if_running(driver, sweep_dir)
    assert driver.returncode == 0, output[-4000:]
    dead, retry = study_trials(sweep_dir)
    assert dead.state == TrialState.FAIL and "ended without reporting" in dead.user_attrs["fail_reason"]
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["failed_trial"] == 0
    assert retry.user_attrs["overrides"] == dead.user_attrs["overrides"]
    log = "".join(path.read_text() for path in (sweep_dir / "submitit").rglob("*_log.err"))
    assert "trial 1 retries trial 0 from its checkpoints" in log and "resumed from" in log
