"""Preemption: turn SLURM signals or a request file into one stop decision shared by all ranks, then requeue.

The protocol (the trainer drives it; see ``PreemptionWatcher``):

1. A signal (SIGUSR1, SIGUSR2, SIGTERM) only sets a flag. Nothing is saved inside a signal handler, because a
   save is a collective that every rank must enter at the same point of the loop.
2. Every ``check_every_steps`` optimizer steps all ranks all-reduce (MAX) "my flag is set, or the request file
   exists", so they all take the same decision at the same step.
3. On "stop", the trainer saves a complete checkpoint on all ranks together (atomically: temp name, rename).
4. ``finish_after_checkpoint``: after a barrier, rank 0 removes the request file and, inside a requeueable SLURM
   job, runs ``scontrol requeue``; then every rank exits with ``EXIT_PREEMPTED``. The requeued job runs the same
   command line, and the trainer's ``--resume auto`` picks up the latest complete checkpoint.

Why a request file: a job step's processes are the node launchers, not our ranks (``csi_dist.launcher`` passes a
notice on, torchrun's elastic agent dies on SIGUSR1), and a batch script can be told of a preemption only on its
own shell. So every batch script (the job recipe, csi_dist/cluster/jobs.py) asks for the signal on the batch shell
only (``--signal=B:USR1@<lead>``), and its trap writes the file named by ``$CSI_PREEMPT_REQUEST_FILE``:
``<run_dir>/PREEMPT_REQUESTED``, or for a sweep trial, whose run dir the batch shell cannot know, a file of its job
under the sweep dir. The watcher reads both ``<run_dir>/PREEMPT_REQUESTED`` and that file. Ranks started directly
(submitit, ``srun python``) still receive signals themselves.

The trap writes the id of the job segment it belongs to (``<job id>.<restart count>``). When Slurm requeues a job
it sends SIGTERM to the old batch shell, whose trap then writes the file once more; the new segment recognises
that file as stale and ignores it instead of stopping again at once. An empty file (``touch``) is a manual
request and always counts.

A rank that dies or hangs gives no notice: the survivors' next collective fails (at once, or after
``training.collective_timeout_s``), they exit with status 3 (``exit_codes.EXIT_RANK_LOST``) and the job is requeued
after a failure (``csi_dist.cluster.slurm``); the requeued job resumes from the newest periodic checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import NoReturn

from csi_dist.cluster.slurm import current_segment_id, requeue, slurm_job_to_requeue
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.data.workers import STOP_NOTICES
from csi_dist.core.run_dir import PREEMPT_REQUEST, RunDir

log = logging.getLogger(__name__)

REQUEST_FILE_NAME = PREEMPT_REQUEST  # <run_dir>/PREEMPT_REQUESTED (csi_dist.core.run_dir)
# set by the job recipe's batch scripts: the request file their notice trap writes (csi_dist/cluster/jobs.py)
REQUEST_FILE_VARIABLE = "CSI_PREEMPT_REQUEST_FILE"


def request_files(run_dir: Path) -> list[Path]:
    """Where a preemption request may wait: <run_dir>/PREEMPT_REQUESTED (a manual `touch` too), then the job's file
    named by $CSI_PREEMPT_REQUEST_FILE when it is another one (a sweep trial's)."""
    files = [RunDir(run_dir).preempt_request]
    job_file = os.environ.get(REQUEST_FILE_VARIABLE)
    if job_file and Path(job_file).resolve() != files[0].resolve():
        files.append(Path(job_file))
    return files


class PreemptionWatcher:
    """Signal flag + request file -> the same "stop now" answer on every rank, checked every few steps."""

    def __init__(self, run_dir: Path, check_every_steps: int = 10):
        if check_every_steps < 1:
            raise ValueError(f"check_every_steps must be >= 1, got {check_every_steps}")
        self.request_files = request_files(run_dir)
        self.request_file = self.request_files[0]
        self.check_every_steps = check_every_steps
        self.segment_id = current_segment_id()
        self.received_signal: str | None = None
        self._owner_pid: int | None = None

    def install(self) -> None:
        """Install flag-only handlers in this (main) process (DataLoader workers ignore notices: data.workers)."""
        self._owner_pid = os.getpid()
        # USR1, USR2, TERM and INT (Ctrl-C: a second one interrupts at once): the set the loader's workers ignore
        for signum in STOP_NOTICES:
            signal.signal(signum, self._handle_signal)
            # restart interrupted system calls: a notice arriving while torch.save writes a checkpoint file must not
            # fail that write (torch's C++ writer does not retry EINTR: "unexpected pos ... vs ...")
            signal.siginterrupt(signum, False)
        for request_file in self.request_files:
            if request_file.exists() and not self._request_file_counts(request_file):
                log.info("ignoring %s left by an earlier job segment", request_file)
                request_file.unlink(missing_ok=True)

    def _handle_signal(self, signum: int, frame) -> None:
        if os.getpid() != self._owner_pid:
            # A process forked from the rank inherits this handler and ignores every notice, SIGTERM too (the
            # package's DataLoader workers come from a fork server that ignores them: csi_dist.data.workers). SLURM,
            # `timeout` and Ctrl-C signal the whole process group; the rank decides, then ends its children itself.
            return
        if signum == signal.SIGINT and self.received_signal == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        name = signal.Signals(signum).name
        if self.received_signal is None:
            self.received_signal = name
            # logging is not reentrant-safe in a handler, but the record is short and the flag is already set
            log.warning("received %s: will checkpoint and stop at the next check step%s", name,
                        " (Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else "")

    def _request_file_counts(self, request_file: Path) -> bool:
        try:
            owner = request_file.read_text().strip()
        except FileNotFoundError:
            return False
        return owner == "" or owner == self.segment_id

    def _counting_request_file(self) -> Path | None:
        return next((path for path in self.request_files if self._request_file_counts(path)), None)

    def should_stop(self, global_step: int, accelerator) -> bool:
        """True on every rank, or on none; a collective every ``check_every_steps`` steps, free otherwise.

        All ranks must call it with the same ``global_step`` (e.g. after each optimizer step).
        """
        if global_step % self.check_every_steps != 0:
            return False
        requested_by = self._counting_request_file()
        local_request = self.received_signal is not None or requested_by is not None
        stop = local_request
        if accelerator.num_processes > 1:  # one process asks no one: no device tensor, no wait for the GPU's queue
            import torch  # here, not at the top: csi_dist.submit and the batch-script requeue run without torch
            flag = torch.tensor([int(local_request)], device=accelerator.device)
            stop = bool(accelerator.reduce(flag, reduction="max").item())
        if stop and accelerator.is_main_process:
            reason = self.received_signal or (f"{requested_by}" if local_request else "another rank")
            log.warning("preemption requested (%s): all ranks stop at step %d", reason, global_step)
        return stop

    def finish_after_checkpoint(self, accelerator, resumes_from: str = "the checkpoint just saved",
                                rerun: str = "rerun the same command") -> NoReturn:
        """Call on all ranks after they saved together: requeue from rank 0, then exit with EXIT_PREEMPTED.
        `resumes_from` says where a rerun picks up (an evaluation saves nothing and starts again), `rerun` what to
        type for it."""
        # Nothing is left to stop, and rank 0's requeue makes SLURM SIGTERM every process of the job. Ignored, not
        # flagged: the interpreter drops Python handlers as it shuts down, and the SIGTERM would then turn this
        # rank's 75 into a kill (143), which train.sbatch takes for a lost rank. A second Ctrl-C still stops at once.
        for notice in STOP_NOTICES:
            if notice != signal.SIGINT:
                signal.signal(notice, signal.SIG_IGN)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for request_file in self.request_files:
                request_file.unlink(missing_ok=True)
            job_id = slurm_job_to_requeue()
            if job_id is not None:
                log.warning("requeueing SLURM job %s; it will resume from %s", job_id, resumes_from)
                requeue(job_id)
            else:
                log.warning("exiting with %d: %s to resume from %s", EXIT_PREEMPTED, rerun, resumes_from)
        from csi_dist.core.distributed import leave_process_group
        leave_process_group()
        raise SystemExit(EXIT_PREEMPTED)
