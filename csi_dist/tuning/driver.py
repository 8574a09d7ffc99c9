"""Hyper-parameter sweeps: an Optuna study whose trials are SLURM jobs (or local processes), each a resumable training run.

This module is the driver, the loop on the login node behind ``python -m csi_dist.sweep``: it creates or
resumes the study, starts the trial jobs the study still needs, fails and retries trials whose job died, and
writes the report when the budget is spent. On the console (csi_dist/tuning/console.py) it opens with a summary of
the sweep, prints a line only when a trial starts, ends, is pruned or fails, and ends with the best value, its
parameters and the command that trains them.

    python -m csi_dist.sweep --config configs/demo.ini --space configs/sweep/default.yaml \\
        --n-trials 50 --parallel 4 --executor slurm --gpus-per-node 1 --sweep-dir sweeps/demo
    python -m csi_dist.train --config configs/demo.ini --hyperparams sweeps/demo/best_params.json

How it works
------------
* One trial = one job = one run directory ``<sweep-dir>/trials/trial-<number>``. A job (every rank of it) starts,
  rank 0 takes a trial from the study under a lock (a new one sampled from the space file, or a retry waiting in
  the queue) and records itself as the trial's owner (user attr ``owner``, e.g. ``slurm-123_4``). The job trains with
  ``csi_dist.training.loop.train`` and an epoch-end hook: rank 0 reports ``val_<objective>`` (``trial.report``, step = epoch)
  straight to the shared storage and asks ``trial.should_prune()``; the answer is broadcast to every rank. At the
  end rank 0 tells the study COMPLETE (value = the best ``val_<objective>`` over the trial's evaluations), PRUNED or
  FAIL (the error is kept in the trial's user attr ``fail_reason``).
* SLURM: the driver submits the missing trials as one submitit job array with ``slurm_array_parallelism = --parallel``
  and ``--requeue``. The jobs need no driver: if the driver dies they go on, and a restarted driver (same
  ``--sweep-dir``) loads the same study (``load_if_exists``), finds the jobs in ``jobs.json``, submits only what is
  missing and waits. Local executor: the driver itself keeps ``--parallel`` trial processes running (each is
  ``python -m csi_dist.sweep --run-trial``); a restarted driver lets orphaned ones finish and starts the rest.
* Preemption: the trainer checkpoints and requeues its own job (csi_dist/cluster/preemption.py). The requeued job
  has the same id, finds the RUNNING trial it owns and resumes it from ``<run dir>/checkpoints`` with
  ``--resume auto``: the trial is neither lost nor counted as failed (its user attr ``requeues`` counts the
  interruptions). The trial jobs' batch scripts are the job recipe's (csi_dist/cluster/jobs.py), like
  ``slurm/train.sbatch``'s: SLURM's notice goes to the batch shell, whose trap writes ``<sweep-dir>/notices/<job id>``
  (the shell cannot know the trial's run dir), which the trial's watcher reads; after the step no failure requeue.
* A job that truly died (cancelled, node failure, out of memory, a crash before ``tell``) leaves its trial RUNNING.
  The driver asks SLURM (``squeue``, then ``sacct``) whether each RUNNING trial's job still exists; a requeued job is
  PENDING and so alive. A trial whose job stayed gone for ``--dead-grace-s`` is told FAIL and retried up to
  ``--max-retries`` times with Optuna's ``RetryHeartbeatStaleTrialCallback`` (same parameters, intermediate values
  inherited); the retry copies the dead trial's checkpoints into its run dir and resumes from them. Optuna's own
  heartbeat is not used: JournalStorage does not implement it, and a heartbeat cannot tell a requeued job waiting in
  the queue (alive) from a dead one, whereas SLURM can.
* Budget: a study is done when COMPLETE + PRUNED + FAIL-without-retry trials reach ``--n-trials``. Trials are only
  created under the lock while COMPLETE + PRUNED + RUNNING + WAITING + unretried FAIL < ``--n-trials``, so parallel
  jobs never overshoot. A failed training (e.g. too many non-finite losses at a huge learning rate) is FAIL and
  not retried: the same parameters would fail again.

Storage
-------
Default: ``optuna.storages.JournalStorage(JournalFileBackend(<sweep-dir>/optuna_journal.log,
JournalFileOpenLock))`` on the cluster's shared filesystem. It needs no server (compute nodes often cannot reach
one), every operation is an appended JSON line, so a killed process loses nothing already written, and the
study is rebuilt by replaying the file. ``JournalFileOpenLock`` (O_EXCL create) is used rather than the default
symlink lock because O_EXCL is atomic on NFSv3+ and on Lustre/GPFS; NFSv2 would need ``JournalFileSymlinkLock``.
Caveats: appends from several clients over NFS need ``O_APPEND`` + the lock (Optuna does both); some NFS setups
have lost or corrupted journal lines (optuna#5138), so keep the sweep dir on a filesystem with close-to-open
consistency and do not put SQLite there (file locking over NFS breaks, optuna#6036). The journal suits tens of
concurrent workers; beyond ~100, or with very many trials (every client replays the whole file), use an RDB with
``--storage postgresql://user@host/db`` (optionally behind Optuna's gRPC proxy). The same lock file guards trial
assignment (``<sweep-dir>/assign.lock``).

Outputs
-------
``best_params.json`` ({"best_params": {"section.key": value}, "best_value", ...}: the overrides the best trial
trained with, sampled and fixed ones, readable by ``csi_dist.train --hyperparams``), ``report.md`` (table of
trials, best trial, the command that retrains it), ``trials.csv`` (``;``-separated, as every CSV of the package),
``optimization_history.png`` (whole-number trial ticks) and ``wandb_sweep.yaml`` (the same search for
``wandb sweep``/``wandb agent``). Trials log to W&B (offline by default)
in the group ``logging.wandb_group = <study name>``, one W&B run per trial directory.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import optuna
from optuna.trial import TrialState

from csi_dist.cluster.jobs import submitit_parameters_for_sweep_trials
from csi_dist.core.config import read_text_file
from csi_dist.core.files import atomic_write_json
from csi_dist.tuning.console import TrialEvents, closing_lines, opening_lines
from csi_dist.tuning.report import write_report
from csi_dist.tuning.space import SearchSpace, load_space, wandb_sweep
from csi_dist.tuning.study import (JOBS_NAME, SETTINGS_NAME, SweepError, SweepSettings, budget_used, finished_count,
                                   load_study, open_storage, owners_alive, read_jobs, record_jobs, recover_dead_trials)
from csi_dist.tuning.trial import TrialTask

log = logging.getLogger("csi_dist.sweep")


# ------------------------------------------------------------------------------------------------ trial jobs
def slurm_executor(settings: SweepSettings, n_jobs: int):
    import submitit
    resources = settings.job
    executor = submitit.AutoExecutor(folder=Path(settings.sweep_dir) / "submitit" / "%j", cluster="slurm")
    gpus = int(resources.get("gpus_per_node") or 0)
    parameters = dict(name=f"sweep-{settings.study_name}", nodes=resources.get("nodes", 1),
                      tasks_per_node=resources.get("tasks_per_node") or max(gpus, 1),
                      timeout_min=resources.get("timeout_min", 24 * 60),
                      slurm_array_parallelism=min(settings.parallel, n_jobs),
                      # the notice, --requeue and the teardown of every csi_dist job (csi_dist/cluster/jobs.py)
                      **submitit_parameters_for_sweep_trials(Path(settings.sweep_dir)))
    for key in ("cpus_per_task", "mem_gb"):
        if resources.get(key):
            parameters[key] = resources[key]
    if gpus:
        parameters["gpus_per_node"] = gpus
    if resources.get("partition"):
        parameters["slurm_partition"] = resources["partition"]
    executor.update_parameters(**parameters)
    return executor


def submit_slurm_jobs(settings: SweepSettings, n_jobs: int) -> None:
    executor = slurm_executor(settings, n_jobs)
    task = TrialTask(settings.sweep_dir, use_gpus=bool(settings.job.get("gpus_per_node")))
    with executor.batch():
        jobs = [executor.submit(task) for _ in range(n_jobs)]
    owners = [f"slurm-{job.job_id}" for job in jobs]
    record_jobs(Path(settings.sweep_dir), [{"owner": owner, "submitted": time.time()} for owner in owners])
    log.info("submitted %d trial job(s) (at most %d at a time): %s", n_jobs, settings.parallel, " ".join(owners))


def start_local_jobs(settings: SweepSettings, n_jobs: int) -> None:
    sweep_dir = Path(settings.sweep_dir)
    (sweep_dir / "logs").mkdir(exist_ok=True)
    started = []
    for _ in range(n_jobs):
        log_path = sweep_dir / "logs" / f"local-{time.time_ns()}.log"
        with open(log_path, "w") as log_file:  # the child keeps its own descriptor
            process = subprocess.Popen([sys.executable, "-m", "csi_dist.sweep", "--run-trial",
                                        "--sweep-dir", str(sweep_dir)], stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        owner = f"local-{socket.gethostname()}-{process.pid}"
        started.append({"owner": owner, "submitted": time.time(), "log": str(log_path)})
        log.info("started trial process %s (log %s)", owner, log_path)
    record_jobs(sweep_dir, started)


def reap_children() -> None:
    """Collect exited local trial processes (they are our children unless this driver was restarted)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def launch_missing_jobs(settings: SweepSettings, space: SearchSpace) -> int:
    """Start the jobs the study still needs; returns how many jobs are alive or were started."""
    sweep_dir = Path(settings.sweep_dir)
    reap_children()
    trials = load_study(settings, space).get_trials(deepcopy=False)
    jobs = read_jobs(sweep_dir)
    alive = owners_alive([job["owner"] for job in jobs])
    owning = {t.user_attrs.get("owner") for t in trials if t.state != TrialState.WAITING}
    live_jobs = [job["owner"] for job in jobs if alive.get(job["owner"]) is not False]
    waiting_for_a_trial = [owner for owner in live_jobs if owner not in owning]
    needed = settings.n_trials - budget_used(trials) - len(waiting_for_a_trial)
    needed += sum(t.state == TrialState.WAITING for t in trials)  # queued retries need a job too
    if settings.executor == "local":  # this driver is the scheduler: at most --parallel processes at once
        needed = min(needed, settings.parallel - len(live_jobs))
    if needed > 0 and len(jobs) + needed > 3 * settings.n_trials + 10:
        raise SweepError(f"{sweep_dir / JOBS_NAME}: {len(jobs)} jobs started for {settings.n_trials} trials; "
                         f"refusing to start more (their logs are under {sweep_dir})")
    if needed > 0:
        (submit_slurm_jobs if settings.executor == "slurm" else start_local_jobs)(settings, needed)
    return len(live_jobs) + max(needed, 0)


# ------------------------------------------------------------------------------------------------ the driver
def slurm_unreachable_because() -> str | None:
    """Why this machine cannot submit SLURM jobs now (no sbatch on PATH, no controller answering), None if it can."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as error:
        return f"sbatch is on PATH but `scontrol ping` failed ({error})"
    if re.search(r"\bUP\b", ping.stdout):  # "Slurmctld(primary) at <host> is UP"
        return None
    return "sbatch is on PATH but no SLURM controller answers `scontrol ping`"


def choose_executor(args: argparse.Namespace, stored: str | None) -> tuple[str, str]:
    """The executor and why: --executor, else the one the sweep started with, else slurm only where SLURM answers."""
    if args.executor:
        executor, reason = args.executor, "--executor"
    elif stored:
        executor, reason = stored, "as this sweep started; --executor changes it"
    elif (unreachable := slurm_unreachable_because()) is None:
        executor, reason = "slurm", "default here: sbatch is on PATH and the SLURM controller answers"
    else:
        executor, reason = "local", f"default here: {unreachable}; trials run as processes on this machine"
    if executor == "local" and (args.nodes != 1 or (args.tasks_per_node or 1) != 1):
        raise SweepError(f"trials of several processes (--nodes {args.nodes}, --tasks-per-node {args.tasks_per_node}) "
                         f"need --executor slurm; the executor is local ({reason})")
    return executor, reason


def create_or_resume(args: argparse.Namespace) -> SweepSettings:
    """First start: validate and write sweep.json + the space copy + the study. Restart: check it is the same sweep.
    Either way the opening summary says what runs where."""
    sweep_dir = args.sweep_dir.resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    config = str(args.config.resolve()) if args.config else None
    job = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "tasks_per_node": args.tasks_per_node,
           "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb, "partition": args.partition,
           "timeout_min": args.timeout_min}
    settings_path = sweep_dir / SETTINGS_NAME
    if settings_path.exists():
        settings = SweepSettings.load(sweep_dir)
        space_text = read_text_file(args.space, "search-space file") if args.space else None
        mismatches = [name for name, given, stored in (
            ("--config", config, settings.config), ("--set", args.overrides, settings.overrides),
            ("--study-name", args.study_name or settings.study_name, settings.study_name),
            ("--storage", args.storage, settings.storage),
            ("--space", space_text, read_text_file(settings.space, "search-space file") if space_text else None))
            if given != stored]
        if mismatches:
            raise SweepError(f"{settings_path}: this sweep dir holds a study started with other {', '.join(mismatches)}"
                             f"; restart with the same values or use another --sweep-dir")
        settings.executor, executor_reason = choose_executor(args, settings.executor)
        settings.n_trials, settings.parallel = args.n_trials, args.parallel
        settings.max_retries, settings.job = args.max_retries, job
        resumed = True
    else:
        if args.space is None:
            raise SweepError("--space is required to start a sweep (e.g. configs/sweep/default.yaml)")
        space = load_space(args.space)
        space.check_against_config(args.config, args.overrides)
        executor, executor_reason = choose_executor(args, None)
        space_copy = sweep_dir / f"space{args.space.suffix}"
        shutil.copyfile(args.space, space_copy)
        settings = SweepSettings(sweep_dir=str(sweep_dir), study_name=args.study_name or sweep_dir.name,
                                 config=config, overrides=list(args.overrides), space=str(space_copy),
                                 n_trials=args.n_trials, parallel=args.parallel, executor=executor,
                                 storage=args.storage, max_retries=args.max_retries, job=job)
        resumed = False
    space = load_space(settings.space)
    optuna.create_study(study_name=settings.study_name, storage=open_storage(settings),
                        direction=space.study_direction(), load_if_exists=True)
    atomic_write_json(settings_path, asdict(settings))
    import yaml
    (sweep_dir / "wandb_sweep.yaml").write_text(yaml.safe_dump(
        wandb_sweep(space, args.config, settings.overrides, settings.n_trials), sort_keys=False), encoding="utf-8")
    for line in opening_lines(settings, space, executor_reason, resumed):
        log.info("%s", line)
    return settings


def drive(settings: SweepSettings, wait: bool, poll_s: float, dead_grace_s: float, timeout_min: float) -> int:
    space = load_space(settings.space)
    suspects: dict[int, float] = {}
    events = TrialEvents(settings, space)
    deadline = time.monotonic() + timeout_min * 60 if timeout_min else math.inf
    while True:
        recover_dead_trials(settings, space, suspects, dead_grace_s)
        trials = load_study(settings, space).get_trials(deepcopy=False)
        for line in events.lines(trials):  # silent while nothing changes
            log.info("%s", line)
        done = finished_count(trials)
        if done >= settings.n_trials:
            break
        launch_missing_jobs(settings, space)
        if not wait:
            log.info("%d/%d trials finished; jobs run on without this driver (rerun it to collect the report)",
                     done, settings.n_trials)
            return 0
        if time.monotonic() > deadline:
            log.error("%d/%d trials finished after --wait-timeout-min %s; jobs go on, rerun to continue",
                      done, settings.n_trials, timeout_min)
            return 1
        time.sleep(poll_s)
    study = load_study(settings, space)
    for line in closing_lines(study, settings, space, write_report(study, settings, space)):
        log.info("%s", line)
    return 0
