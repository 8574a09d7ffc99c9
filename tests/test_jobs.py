"""One job recipe (issue 33): slurm/train.sbatch, csi_dist.submit and the sweep's trial jobs share the notice, its lead
time, --requeue, the notice trap, the srun wrapper and the after-step teardown (csi_dist/cluster/jobs.py).

The submitit scripts are the text submitit writes at submission (`_make_submission_file_text`), built here without a
cluster; tests/test_slurm.py and tests/test_slurm_sweep.py read the scripts of jobs submitted for real.
"""
from __future__ import annotations

import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, subprocess_env
from csi_dist.cluster.jobs import render_sbatch
from csi_dist.cluster.preemption import PreemptionWatcher
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.tuning.study import SweepSettings

SBATCH = REPO_ROOT / "slurm" / "train.sbatch"
SUBMITIT_COMMAND = "python -u -m submitit.core._submit /logs"


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch):
    """submitit's SLURM executor refuses to exist without srun on PATH: a stand-in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{subprocess_env()['PATH']}")


def submit_script(tmp_path: Path, run_dir: Path) -> str:
    from csi_dist.submit import build_executor, parse_args
    args, _ = parse_args(["--nodes", "2", "--log-dir", str(tmp_path / "submitit")])
    return build_executor(args, run_dir)._executor._make_submission_file_text(SUBMITIT_COMMAND, "uid")


def sweep_script(sweep_dir: Path) -> str:
    from csi_dist.tuning.driver import slurm_executor
    settings = SweepSettings(sweep_dir=str(sweep_dir), study_name="s", config=None, overrides=[], space="space.yaml",
                             n_trials=4, parallel=2, executor="slurm", job={"nodes": 2})
    return slurm_executor(settings, 4)._executor._make_submission_file_text(SUBMITIT_COMMAND, "uid")


def job_parts(script: str) -> dict[str, list[str]]:
    """The parts every job must share: the signal and requeue options (sorted, as submitit writes them), the notice
    trap with the srun wrapper (from the line that makes the request file's folder to the end of the srun function),
    the teardown (the step's status to the exit)."""
    lines = script.splitlines()
    notice_start = next(i for i, line in enumerate(lines) if line.startswith("mkdir -p \"$(dirname \"$CSI_PREEMPT"))
    srun_start = next(i for i, line in enumerate(lines) if line.startswith("srun() {"))
    notice_end = lines.index("}", srun_start) + 1
    teardown_start = lines.index("status=$?")
    return {"options": sorted(line for line in lines if re.match(r"#SBATCH --(signal|requeue)\b", line)),
            "notice": lines[notice_start:notice_end],
            "teardown": lines[teardown_start:lines.index('exit "$status"', teardown_start) + 1]}


def test_the_committed_sbatch_is_the_one_the_recipe_generates():
    text = SBATCH.read_text()
    assert render_sbatch(text) == text, "slurm/train.sbatch is stale: run python -m csi_dist.cluster.jobs sbatch --write"


def test_sbatch_submit_and_sweep_trials_write_the_same_notice_requeue_and_teardown(tmp_path, srun_on_path):
    sbatch, submit = job_parts(SBATCH.read_text()), job_parts(submit_script(tmp_path, tmp_path / "run"))
    sweep = job_parts(sweep_script(tmp_path / "sweep"))
    # the notice 120 s before the time limit, to the batch shell only; requeue on (written out here, not imported)
    assert sorted(sbatch["options"]) == ["#SBATCH --requeue", "#SBATCH --signal=B:USR1@120"]
    assert sorted(submit["options"]) == sorted(sweep["options"]) == sorted(sbatch["options"])
    assert any(line == "trap 'csi_notice USR1' USR1" for line in sbatch["notice"])
    assert submit["notice"] == sweep["notice"] == sbatch["notice"]
    assert submit["teardown"] == sbatch["teardown"]
    after_step = [line for line in sbatch["teardown"] if "csi_dist.cluster.slurm after-step" in line]
    assert after_step == ['if "$CSI_PYTHON" -m csi_dist.cluster.slurm after-step "$status" "$run_dir"; then']
    # a sweep trial's batch shell knows no run dir: the same rule, without a failure requeue (the driver retries)
    assert sweep["teardown"] == [line.replace(' "$run_dir"', "") for line in sbatch["teardown"]]


def test_submit_and_sweep_scripts_point_the_notice_at_the_file_their_trainer_reads(tmp_path, srun_on_path):
    run_dir = tmp_path / "run"
    submit = submit_script(tmp_path, run_dir)
    assert f"run_dir={run_dir.resolve()}" in submit.splitlines()
    assert 'export CSI_PREEMPT_REQUEST_FILE="$run_dir"/PREEMPT_REQUESTED' in submit.splitlines()
    sweep = sweep_script(tmp_path / "sweep")
    assert f'export CSI_PREEMPT_REQUEST_FILE={(tmp_path / "sweep" / "notices").resolve()}/"$SLURM_JOB_ID"' in sweep


def run_batch_script(script: str, tmp_path: Path, step_status: int) -> tuple[subprocess.CompletedProcess, Path]:
    """Run a submitit batch script with a stand-in srun (the step runs until released, then ends with `step_status`),
    send USR1 to the batch shell while the step runs, as `--signal=B:USR1@120` would; SLURM job 7, restart 1."""
    bin_dir, started, release = tmp_path / "fake_bin", tmp_path / "step_started", tmp_path / "release_step"
    bin_dir.mkdir()
    fake_srun = bin_dir / "srun"
    fake_srun.write_text(f"#!/bin/sh\ntouch {started}\nwhile [ ! -e {release} ]; do sleep 0.05; done\n"
                         f"exit {step_status}\n")
    fake_srun.chmod(fake_srun.stat().st_mode | stat.S_IXUSR)
    path = tmp_path / "job.sh"
    path.write_text(script)
    env = subprocess_env(PATH=f"{bin_dir}:{subprocess_env()['PATH']}", SLURM_JOB_ID="7", SLURM_RESTART_COUNT="1")
    batch = subprocess.Popen(["bash", str(path)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline and batch.poll() is None, "the step never started"
            time.sleep(0.05)
        batch.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert batch.poll() is None, "the notice ended the batch shell"
        release.touch()
        output, _ = batch.communicate(timeout=60)
    finally:
        if batch.poll() is None:
            batch.kill()
    return subprocess.CompletedProcess(batch.args, batch.returncode, output), path


@pytest.mark.parametrize("path", ["submit", "sweep trial"])
def test_a_notice_to_the_batch_shell_writes_the_request_and_the_step_status_is_the_jobs(tmp_path, srun_on_path, path):
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    script = submit_script(tmp_path, run_dir) if path == "submit" else sweep_script(sweep_dir)
    result, _ = run_batch_script(script, tmp_path, EXIT_PREEMPTED)
    request = run_dir / "PREEMPT_REQUESTED" if path == "submit" else sweep_dir / "notices" / "7"
    assert request.read_text().strip() == "7.1", result.stdout  # this segment's id: stale for the next one
    assert "got SIGUSR1" in result.stdout
    # the notice did not cut the wait short: the step's own 75 is the job's, and no failure requeue was asked for
    assert "training exited with status 75" in result.stdout and result.returncode == EXIT_PREEMPTED, result.stdout


class OneProcess:
    """What PreemptionWatcher.should_stop asks of accelerate's Accelerator, for one process."""
    device, num_processes, is_main_process = "cpu", 1, True


def test_a_sweep_trials_watcher_reads_its_jobs_notice_and_ignores_a_stale_one(tmp_path, monkeypatch):
    notice = tmp_path / "sweep" / "notices" / "7"
    notice.parent.mkdir(parents=True)
    monkeypatch.setenv("CSI_PREEMPT_REQUEST_FILE", str(notice))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    trial_dir = tmp_path / "sweep" / "trials" / "trial-0000"
    notice.write_text("7.1\n")  # this segment's notice
    assert PreemptionWatcher(trial_dir, check_every_steps=1).should_stop(1, OneProcess())
    notice.write_text("7.0\n")  # the previous segment's, written by its trap as SLURM requeued it
    assert not PreemptionWatcher(trial_dir, check_every_steps=1).should_stop(1, OneProcess())
