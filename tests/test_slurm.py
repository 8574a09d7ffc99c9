"""Training on the real local SLURM cluster (slurm/start_cluster.sh): 2 nodes, preemption, requeue, submitit.

Every interrupted run must end with final weights bit-identical to the uninterrupted run of the same config
(CPU, deterministic, 2 nodes x 1 process): that proves the resume continued at the exact step and data position.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO_ROOT, subprocess_env
from csi_dist.cluster.slurm import FAILURE_REQUEUE_DIR
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.core.faults import SLOW_BATCH_VARIABLE
from test_jobs import job_parts
from slurm_helpers import (cluster_problem, differing_tensors, job_field, run, sbatch, wait_for_job_end, wait_until)

pytestmark = pytest.mark.slurm

SBATCH_SCRIPT = REPO_ROOT / "slurm" / "train.sbatch"
JOB_TIMEOUT_S = 180


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "shards"
    subprocess.run([sys.executable, "-m", "csi_dist.shards", "--demo", "96", "--out", str(out), "--size", "32"],
                   check=True, capture_output=True, timeout=120, env=subprocess_env())
    return out


def trainer_args(shards: Path, run_dir: Path) -> list[str]:
    """Demo config, shrunk: 2 epochs of 9 steps, a periodic checkpoint every 2 steps, preemption checked every step."""
    overrides = {"data.shard_dir": shards, "data.image_size": 32, "model.model_arch": "Tiny_CNN",
                 "training.batch_size": 4, "training.n_epochs": 2,
                 "training.num_workers": 1, "training.deterministic": "true", "logging.wandb_mode": "disabled",
                 "callbacks.checkpoint_every_steps": 2, "callbacks.preemption_check_every_steps": 1}
    args = ["--config", str(REPO_ROOT / "configs" / "demo.ini"), "--run-dir", str(run_dir)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def job_env() -> dict:
    """Each loader batch held back 0.2 s (csi_dist/core/faults.py): Tiny_CNN would run the 18 steps in about a second,
    before a signal could land mid-run; results are unchanged."""
    return subprocess_env(CSI_REPO=str(REPO_ROOT), **{SLOW_BATCH_VARIABLE: "0.2"})


def submit_training(tmp_path: Path, shards: Path, name: str) -> tuple[str, Path, Path]:
    run_dir = tmp_path / "run"
    job_id = sbatch(SBATCH_SCRIPT, ["--nodes=2", f"--job-name={name}", f"--output={tmp_path}/%x-%j.out"],
                    trainer_args(shards, run_dir), cwd=REPO_ROOT, env=job_env())
    return job_id, run_dir, tmp_path / f"{name}-{job_id}.out"


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    names = [path.name for path in root.iterdir()] if root.is_dir() else []
    return sorted(int(name[5:]) for name in names if re.fullmatch(r"step-\d{8}", name))


def assert_the_stopped_step_ended_75_without_a_failure_requeue(text: str, run_dir: Path) -> None:
    """The step of the notice ended with the trainer's 75 (each node's launcher passes its ranks' status on), so the
    batch script took it for the notice it was: no failure-requeue marker (none of callbacks.max_failure_requeues
    used up), no second `scontrol requeue`. Then the requeued segment ended 0."""
    statuses = re.findall(r"\] training exited with status (\d+)", text)
    assert statuses == [str(EXIT_PREEMPTED), "0"], text[-4000:]
    markers = run_dir / FAILURE_REQUEUE_DIR
    assert not markers.exists() or list(markers.iterdir()) == [], (list(markers.iterdir()), text[-4000:])
    assert "after the failure" not in text, text[-4000:]


def wait_for_checkpoint(run_dir: Path, step: int) -> None:
    """Training is under way: a periodic checkpoint of at least `step` exists."""
    wait_until(lambda: any(s >= step for s in checkpoint_steps(run_dir)), JOB_TIMEOUT_S,
               f"a checkpoint of step >= {step} in {run_dir}")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, demo_shards) -> tuple[str, Path, Path]:
    """The uninterrupted 2-node run every other test compares against."""
    tmp_path = tmp_path_factory.mktemp("reference")
    job_id, run_dir, log = submit_training(tmp_path, demo_shards, "reference")
    state = wait_for_job_end(job_id, JOB_TIMEOUT_S)
    assert state == "COMPLETED", f"job {job_id} {state}:\n{log.read_text()[-4000:]}"
    return job_id, run_dir, log


def test_two_node_job_completes_and_writes_checkpoints(reference_run):
    job_id, run_dir, log = reference_run
    text = log.read_text()
    assert "node 0/2" in text and "node 1/2" in text, text[-3000:]
    assert "2 process(es)" in text
    assert checkpoint_steps(run_dir)[-1] == 18  # 2 epochs x 9 steps; the final checkpoint
    for name in ("resolved_config.ini", "training_history.json", "weights/last.safetensors",
                 "weights/best.safetensors"):
        assert (run_dir / name).is_file(), name
    assert job_field(job_id, "Restarts") == "0"


def test_signalled_job_is_requeued_and_matches_the_uninterrupted_run(tmp_path, demo_shards, reference_run):
    job_id, run_dir, log = submit_training(tmp_path, demo_shards, "signalled")
    wait_for_checkpoint(run_dir, 2)
    # what --signal=B:USR1@120 does before the time limit, now
    run(["scancel", "--batch", "--signal=USR1", job_id])
    state = wait_for_job_end(job_id, JOB_TIMEOUT_S)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job_id} {state}:\n{text[-4000:]}"
    assert job_field(job_id, "Restarts") == "1"
    assert "got SIGUSR1" in text and f"requeueing SLURM job {job_id}" in text
    stop_step = int(re.search(r"preemption requested \(.*\): all ranks stop at step (\d+)", text).group(1))
    assert 2 <= stop_step < 18
    resumed = re.search(r"resumed from \S*step-(\d{8})", text)
    assert resumed and int(resumed.group(1)) == stop_step, text[-4000:]
    assert not (run_dir / "PREEMPT_REQUESTED").exists() or "ignoring" in text
    assert_the_stopped_step_ended_75_without_a_failure_requeue(text, run_dir)
    assert differing_tensors(run_dir / "weights" / "last.safetensors",
                             reference_run[1] / "weights" / "last.safetensors") == []


def test_scontrol_requeue_is_a_notice_the_ranks_save_on_with_workers_on(tmp_path, demo_shards, reference_run):
    """`scontrol requeue` sends SIGTERM to every process of the job: the launchers, the ranks and their DataLoader
    workers (on here). The workers used to die first and take their ranks down with a traceback; now the ranks save
    a checkpoint at the step they agree on, and the requeued job resumes from it."""
    job_id, run_dir, log = submit_training(tmp_path, demo_shards, "requeued")
    wait_for_checkpoint(run_dir, 2)
    run(["scontrol", "requeue", job_id])
    state = wait_for_job_end(job_id, JOB_TIMEOUT_S)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job_id} {state}:\n{text[-4000:]}"
    assert "is killed by signal" not in text, text[-4000:]
    stop_step = int(re.search(r"preemption requested \(.*\): all ranks stop at step (\d+)", text).group(1))
    resumed = re.search(r"resumed from \S*step-(\d{8})", text)
    assert resumed and int(resumed.group(1)) == stop_step, text[-4000:]
    assert_the_stopped_step_ended_75_without_a_failure_requeue(text, run_dir)
    assert differing_tensors(run_dir / "weights" / "last.safetensors",
                             reference_run[1] / "weights" / "last.safetensors") == []


def test_scancel_of_a_training_job_ends_it_cancelled_without_a_requeue(tmp_path, demo_shards):
    """scancel sends every process the SIGTERM a requeue sends: the ranks may save, but the job stays cancelled."""
    job_id, run_dir, log = submit_training(tmp_path, demo_shards, "cancelled")
    wait_for_checkpoint(run_dir, 2)
    run(["scancel", job_id])
    state = wait_for_job_end(job_id, JOB_TIMEOUT_S, start_when_requeued=False)
    time.sleep(5)  # a requeue decided late would show here
    assert state == "CANCELLED" and job_field(job_id, "JobState") in ("CANCELLED", None)
    assert job_field(job_id, "Restarts") in ("0", None)
    text = log.read_text()
    assert f"requeueing SLURM job {job_id}" not in text, text[-4000:]
    assert f"job {job_id} was cancelled (scancel); it ends instead of requeueing" in text, text[-4000:]
    assert "is killed by signal" not in text, text[-4000:]  # the ranks saved (the launchers still print theirs)


def test_job_killed_without_warning_resumes_from_the_last_periodic_checkpoint(tmp_path, demo_shards, reference_run):
    job_id, run_dir, log = submit_training(tmp_path, demo_shards, "killed")
    wait_for_checkpoint(run_dir, 4)
    run(["scancel", "--full", "--signal=KILL", job_id])  # every process of the job, no chance to save
    state = wait_for_job_end(job_id, JOB_TIMEOUT_S, start_when_requeued=False)
    # a cancelled job stays cancelled, even when a rank outlives the others for a moment and sees them gone
    assert state != "COMPLETED" and job_field(job_id, "Restarts") in (None, "0"), log.read_text()[-4000:]
    # the newest complete checkpoint: a periodic one (every 2 steps), the end of epoch 0 (step 9), or one the ranks
    # saved together on the SIGTERM that SLURM sends the remaining processes of a step whose launcher was killed
    # (their data-loader workers ignore it)
    last_periodic = checkpoint_steps(run_dir)[-1]
    text = log.read_text()
    assert last_periodic < 18 and (last_periodic % 2 == 0 or last_periodic == 9
                                   or f"all ranks stop at step {last_periodic}" in text), text

    # the same command line again: --resume auto takes the newest complete checkpoint
    second_id, _, second_log = submit_training(tmp_path, demo_shards, "killed")
    state = wait_for_job_end(second_id, JOB_TIMEOUT_S)
    text = second_log.read_text()
    assert state == "COMPLETED", f"job {second_id} {state}:\n{text[-4000:]}"
    assert re.search(rf"resumed from \S*step-{last_periodic:08d}", text), text[-4000:]
    assert differing_tensors(run_dir / "weights" / "last.safetensors",
                             reference_run[1] / "weights" / "last.safetensors") == []


@pytest.mark.parametrize("notice", ["USR2 to the steps", "USR1 to the batch shell"])
def test_submitit_job_on_two_nodes_survives_a_preemption_signal(tmp_path, demo_shards, reference_run, notice):
    """submitit's own notice (USR2 to the steps) and the one train.sbatch handles (USR1 to the batch shell, which
    used to kill submitit's batch script outright): both checkpoint, requeue and end bit-identical."""
    run_dir = tmp_path / "run"
    submitted = subprocess.run(
        [sys.executable, "-m", "csi_dist.submit", "--nodes", "2", "--timeout-min", "60", "--job-name", "submitit",
         "--log-dir", str(tmp_path / "submitit"), *trainer_args(demo_shards, run_dir)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={key: value for key, value in job_env().items() if key != "OMP_NUM_THREADS"})  # the launcher sets none
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    log = Path(re.search(r"log: (\S+)", submitted.stdout).group(1))
    wait_for_checkpoint(run_dir, 2)
    if notice == "USR2 to the steps":  # submitit's preemption signal: the ranks themselves receive it
        run(["scancel", "--signal=USR2", job_id])
    else:
        run(["scancel", "--batch", "--signal=USR1", job_id])
    state = wait_for_job_end(job_id, JOB_TIMEOUT_S)
    logs = "".join(path.read_text() for path in (tmp_path / "submitit").glob(f"{job_id}_*_log.*"))
    assert state == "COMPLETED", f"job {job_id} {state}:\n{logs[-4000:]}"
    assert log.is_file()
    assert job_field(job_id, "Restarts") == "1"
    assert "received SIGUSR2" in logs or notice != "USR2 to the steps", logs[-4000:]
    # the batch script submitit wrote has train.sbatch's notice, requeue and teardown (csi_dist/cluster/jobs.py)
    [script] = (tmp_path / "submitit").glob(f"{job_id}_submission.sh")
    assert job_parts(script.read_text()) == job_parts(SBATCH_SCRIPT.read_text())
    assert re.search(r"preemption requested \(.*\): all ranks stop at step \d+", logs), logs[-4000:]
    assert re.search(r"resumed from \S*step-\d{8}", logs), logs[-4000:]
    assert differing_tensors(run_dir / "weights" / "last.safetensors",
                             reference_run[1] / "weights" / "last.safetensors") == []


def submitit_task(job_id: str, rank: int) -> psutil.Process | None:
    """The process of one task (= one rank) of a submitit job, once it runs."""
    for process in psutil.process_iter(["cmdline"]):
        if "submitit.core._submit" not in " ".join(process.info["cmdline"] or []):
            continue
        try:
            environment = process.environ()
        except psutil.Error:
            continue
        if environment.get("SLURM_JOB_ID") == job_id and environment.get("SLURM_PROCID") == str(rank):
            return process
    return None


def test_submitit_job_whose_rank_is_killed_requeues_itself_and_ends_bit_identical(tmp_path, demo_shards,
                                                                                  reference_run):
    """The lost-rank rule of train.sbatch holds for csi_dist.submit too: the batch script requeues after the step."""
    run_dir = tmp_path / "run"
    submitted = subprocess.run(
        [sys.executable, "-m", "csi_dist.submit", "--nodes", "2", "--timeout-min", "60", "--job-name", "submitit",
         "--log-dir", str(tmp_path / "submitit"), *trainer_args(demo_shards, run_dir),
         "--set", "training.collective_timeout_s=20"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={key: value for key, value in job_env().items() if key != "OMP_NUM_THREADS"})
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    try:
        wait_for_checkpoint(run_dir, 2)
        victim = wait_until(lambda: submitit_task(job_id, 1), 30, "the task of rank 1")
        victim.kill()  # as the OOM killer or a crashing node would
        state = wait_for_job_end(job_id, JOB_TIMEOUT_S)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    logs = "".join(path.read_text() for path in sorted((tmp_path / "submitit").glob(f"{job_id}_*_log.*")))
    assert state == "COMPLETED", f"job {job_id} {state}:\n{logs[-4000:]}"
    assert job_field(job_id, "Restarts") == "1"
    assert f"requeueing SLURM job {job_id} after the failure (1 of at most 3)" in logs, logs[-4000:]
    assert re.search(r"resumed from \S*step-\d{8}", logs), logs[-4000:]
    assert differing_tensors(run_dir / "weights" / "last.safetensors",
                             reference_run[1] / "weights" / "last.safetensors") == []


def test_submitit_job_with_a_bad_config_fails_once_with_the_trainers_exit_code(tmp_path, demo_shards):
    """The batch script requeues after a failure, never after a bad config: the task leaves with the trainer's 2.
    (A config error submit can see is refused before submitting: tests/test_command_line.py; shards that are not
    there on the nodes only the job finds.)"""
    missing = tmp_path / "no_shards_here"
    submitted = subprocess.run(
        [sys.executable, "-m", "csi_dist.submit", "--nodes", "2", "--timeout-min", "10", "--job-name", "bad-config",
         "--log-dir", str(tmp_path / "submitit"), *trainer_args(demo_shards, tmp_path / "run"),
         "--set", f"data.shard_dir={missing}"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=job_env())
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    state = wait_for_job_end(job_id, JOB_TIMEOUT_S)
    logs = "".join(path.read_text() for path in sorted((tmp_path / "submitit").glob(f"{job_id}_*_log.*")))
    assert state == "FAILED" and job_field(job_id, "ExitCode") == "2:0", f"{state}\n{logs[-3000:]}"
    assert job_field(job_id, "Restarts") == "0" and str(missing) in logs


@pytest.mark.parametrize("how", ["preemption notice", "scancel"])
def test_only_a_job_that_was_not_cancelled_is_requeued(tmp_path, how):
    """scancel sends the SIGTERM a preemption sends; a rank asking "may I requeue?" must hear no after a cancel."""
    answer = tmp_path / "answer.txt"
    script = tmp_path / "ask.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "ask() {\n  sleep 1\n"
        f"  {sys.executable} -c 'from csi_dist.cluster.slurm import slurm_job_to_requeue as q; print(q())' "
        f"> {answer} 2>&1\n}}\n"
        "trap ask TERM USR1\nsleep 120 & wait\nsleep 1\n")
    job_id = sbatch(script, ["--requeue", f"--output={tmp_path}/ask-%j.out"], [], cwd=REPO_ROOT, env=job_env())
    wait_until(lambda: job_field(job_id, "JobState") == "RUNNING", 60, f"job {job_id} to run")
    run(["scancel", *(["--batch", "--signal=USR1"] if how == "preemption notice" else []), job_id])
    wait_until(lambda: answer.exists() and answer.read_text().strip(), 60, "the job's answer")
    run(["scancel", job_id])
    lines = answer.read_text().strip().splitlines()
    if how == "scancel":
        assert lines[-1] == "None" and any("was cancelled" in line for line in lines), lines
    else:
        assert lines[-1] == job_id, lines
