"""Everything csi_dist knows about SLURM, torch-free (the batch scripts and the sweep driver call it).

Job segments (a requeue starts a new one), the requeue and cancel decisions, job states, the exit codes that
decide whether a failed step is requeued, and the rendezvous port. The batch scripts of the job recipe
(csi_dist/cluster/jobs.py: slurm/train.sbatch, csi_dist.submit's, a sweep trial's) call the command line at the bottom:

    python -m csi_dist.cluster.slurm rendezvous-port            # the port of this job segment
    python -m csi_dist.cluster.slurm after-step STATUS RUN_DIR  # exit 0 when the job was requeued after a failure
    python -m csi_dist.cluster.slurm after-step STATUS          # no run dir (a sweep trial's job): never requeued
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import os
import subprocess
import sys
from pathlib import Path

from csi_dist.core.exit_codes import EXIT_PREEMPTED, NOT_REQUEUED_AFTER
from csi_dist.core.run_dir import FAILURE_REQUEUES, RunDir

log = logging.getLogger(__name__)

# <run_dir>/failure_requeues/<segment id>: one file per job segment that ended in a requeue after a lost rank
FAILURE_REQUEUE_DIR = FAILURE_REQUEUES
# states in which a job still exists and may (again) run; a requeued job is PENDING
ALIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING",
                          "COMPLETING", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED",
                          "RESV_DEL_HOLD"})


def current_segment_id() -> str:
    """Which run of which SLURM job this process belongs to ("" outside SLURM); a requeue starts a new segment."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return ""
    return f"{job_id}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def rendezvous_port() -> int | None:
    """The torch.distributed port of this job segment: one per job and restart, so a requeued job never waits for
    the port of its previous segment to be freed. None outside SLURM."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    return 20000 + (int(job_id) % 4000) * 10 + int(os.environ.get("SLURM_RESTART_COUNT", "0")) % 10


def export_rendezvous_port() -> None:
    """MASTER_PORT for ranks started by submitit, unless set (outside SLURM submitit picks one per job itself)."""
    port = rendezvous_port()
    if port is not None:
        os.environ.setdefault("MASTER_PORT", str(port))


def slurm_job_to_requeue() -> str | None:
    """The id to pass to ``scontrol requeue``, or None when this process is not in a requeueable SLURM job."""
    if os.environ.get("CSI_REQUEUE", "1") == "0":
        return None
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:  # the plain job id of an array element is not what scontrol requeue expects
        job_id = f"{array_job}_{array_task}"
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                               timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("cannot ask SLURM whether job %s may be requeued (%s); not requeueing", job_id, error)
        return None
    if "Requeue=1" not in shown.split():
        log.warning("job %s was submitted without --requeue; it will end instead of requeueing", job_id)
        return None
    if was_cancelled(job_id):
        log.warning("job %s was cancelled (scancel); it ends instead of requeueing", job_id)
        return None
    return job_id


def was_cancelled(job_id: str) -> bool:
    """Whether someone cancelled the job. `scancel` sends the same SIGTERM as a preemption and `scontrol` only shows
    COMPLETING then, but accounting already records CANCELLED; without accounting we cannot tell (False)."""
    try:
        states = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                                text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return False
    return any(state.startswith("CANCELLED") for state in states)


def requeue(job_id: str) -> bool:
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (exit %d): %s", job_id, result.returncode, result.stderr.strip())
    return result.returncode == 0


def requeue_after_failure(run_dir: Path | None, max_requeues: int) -> bool:
    """After a lost rank: requeue this SLURM job, so that it resumes from its newest complete checkpoint.

    Surviving ranks and the batch script after the step may all call this; the one that creates this job segment's
    marker file requeues, the others do nothing. At most ``max_requeues`` failure requeues per run directory, so a
    rank that dies at the same point every time ends the job instead of looping. True when this call requeued.
    """
    job_id = slurm_job_to_requeue()
    if job_id is None or run_dir is None:
        log.error("not requeued (the reason is above, or this is no SLURM job): rerun the same command to resume "
                  "from the newest checkpoint")
        return False
    markers = RunDir(run_dir).failure_requeues
    markers.mkdir(parents=True, exist_ok=True)
    earlier = sum(1 for _ in markers.iterdir())
    if earlier >= max_requeues:
        log.error("not requeueing job %s: this run was requeued after a failure %d times already "
                  "(callbacks.max_failure_requeues=%d)", job_id, earlier, max_requeues)
        return False
    try:
        (markers / current_segment_id()).touch(exist_ok=False)
    except FileExistsError:
        return False  # another survivor of this segment requeues
    log.error("requeueing SLURM job %s after the failure (%d of at most %d); it resumes from the newest complete "
              "checkpoint", job_id, earlier + 1, max_requeues)
    return requeue(job_id)


def job_states(job_ids: list[str]) -> dict[str, str | None]:
    """job id -> SLURM state, or None when SLURM could not be asked (then nobody is declared dead)."""
    if not job_ids:
        return {}
    states: dict[str, str | None] = {}
    try:
        # all of this user's jobs, one array element per line: asking for ids the controller has already
        # forgotten would make squeue fail as a whole
        queued = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-u", getpass.getuser()],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("squeue failed (%s): job states unknown this round", error)
        return {job: None for job in job_ids}
    if queued.returncode != 0:
        log.warning("squeue failed (%s): job states unknown this round", queued.stderr.strip())
        return {job: None for job in job_ids}
    wanted = set(job_ids)
    for line in queued.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job in wanted:
            states[job] = state.split()[0] if state else ""
    missing = [job for job in job_ids if job not in states]
    if missing:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            accounted = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(missing)],
                                       capture_output=True, text=True, timeout=60)
            for line in accounted.stdout.splitlines():
                job, _, state = line.strip().partition("|")
                if job in missing:
                    states[job] = state.split()[0] if state else ""
    for job in missing:
        states.setdefault(job, "GONE")  # neither the controller nor accounting knows it: not running
    return states


def max_failure_requeues(run_dir: Path) -> int:
    """callbacks.max_failure_requeues of the run (the default when it never started: no resolved config yet)."""
    from csi_dist.core.config import CallbacksConfig, ConfigError, load_config  # torch-free
    try:
        return load_config(RunDir(run_dir).resolved_config).callbacks.max_failure_requeues
    except ConfigError:
        return CallbacksConfig().max_failure_requeues


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csi_dist.cluster.slurm", description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("rendezvous-port", help="print this job segment's torch.distributed port")
    after = actions.add_parser("after-step", help="requeue after a failed step (exit 0 when requeued)")
    after.add_argument("status", type=int, help="the step's exit status")
    after.add_argument("run_dir", type=Path, nargs="?", default=None,
                       help="the run's directory (failure requeues are counted there); without it, as for a sweep "
                            "trial's job, a failed step is not requeued: the sweep driver retries the trial")
    args = parser.parse_args(argv)
    if args.action == "rendezvous-port":
        print(rendezvous_port())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.status in NOT_REQUEUED_AFTER:
        return 1
    if args.run_dir is None:
        log.info("step failed with status %d; not requeued: this job has no run dir of its own (a sweep trial's job: "
                 "the sweep driver fails and retries its trial)", args.status)
        return 1
    return 0 if requeue_after_failure(args.run_dir, max_failure_requeues(args.run_dir)) else 1


if __name__ == "__main__":
    sys.exit(main())
