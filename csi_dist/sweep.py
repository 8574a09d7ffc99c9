"""Hyper-parameter sweeps: an Optuna study whose trials are SLURM jobs (or local processes), each a resumable training run.

    python -m csi_dist.sweep --config configs/demo.ini --space configs/sweep/default.yaml \\
        --n-trials 50 --parallel 4 --executor slurm --gpus-per-node 1 --sweep-dir sweeps/demo
    python -m csi_dist.train --config configs/demo.ini --hyperparams sweeps/demo/best_params.json

How it works
------------
* One trial = one job = one run directory ``<sweep-dir>/trials/trial-<number>``. A job (every rank of it) starts,
  rank 0 takes a trial from the study under a lock (a new one sampled from the space file, or a retry waiting in
  the queue) and records itself as the trial's owner (user attr ``owner``, e.g. ``slurm-123_4``). The job trains with
  ``csi_dist.train.train`` and an epoch-end hook: rank 0 reports ``val_<objective>`` (``trial.report``, step = epoch)
  straight to the shared storage and asks ``trial.should_prune()``; the answer is broadcast to every rank. At the
  end rank 0 tells the study COMPLETE (value = the best ``val_<objective>`` over the trial's evaluations), PRUNED or
  FAIL (the error is kept in the trial's user attr ``fail_reason``).
* SLURM: the driver submits the missing trials as one submitit job array with ``slurm_array_parallelism = --parallel``
  and ``--requeue``. The jobs need no driver: if the driver dies they go on, and a restarted driver (same
  ``--sweep-dir``) loads the same study (``load_if_exists``), finds the jobs in ``jobs.json``, submits only what is
  missing and waits. Local executor: the driver itself keeps ``--parallel`` trial processes running (each is
  ``python -m csi_dist.sweep --run-trial``); a restarted driver lets orphaned ones finish and starts the rest.
* Preemption: the trainer checkpoints and requeues its own job (csi_dist/preemption.py). The requeued job has the
  same id, finds the RUNNING trial it owns and resumes it from ``<run dir>/checkpoints`` with ``--resume auto``:
  the trial is neither lost nor counted as failed (its user attr ``requeues`` counts the interruptions).
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
trials, best trial, the command that retrains it), ``trials.csv``, ``optimization_history.png`` and
``wandb_sweep.yaml`` (the same search for ``wandb sweep``/``wandb agent``). Trials log to W&B (offline by default)
in the group ``logging.wandb_group = <study name>``, one W&B run per trial directory.
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from csi_dist.config import ConfigError, load_config
from csi_dist.sweep_space import SearchSpace, load_space, wandb_sweep

log = logging.getLogger("csi_dist.sweep")
# RetryHeartbeatStaleTrialCallback.retried_trial_number is marked experimental (since Optuna 2.8); it is what we need
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

SETTINGS_NAME = "sweep.json"
JOURNAL_NAME = "optuna_journal.log"
JOBS_NAME = "jobs.json"
# Slurm job states in which a job still exists and may (again) run its trial; a requeued job is PENDING.
ALIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING",
                      "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED", "RESV_DEL_HOLD"}
EXIT_PREEMPTED = 75  # csi_dist.preemption.EXIT_PREEMPTED (not imported: that module imports torch)


class SweepError(RuntimeError):
    """The sweep cannot go on as asked (mismatching restart, no complete trial, ...); the message says why."""


# ------------------------------------------------------------------------------------------------ settings, storage
@dataclass
class SweepSettings:
    """Everything a trial job needs, fixed at the sweep's first start (n_trials and parallel may change later)."""
    sweep_dir: str
    study_name: str
    config: str | None
    overrides: list[str]
    space: str  # the copy inside the sweep dir
    n_trials: int
    parallel: int
    executor: str
    storage: str = ""  # "" = journal file in the sweep dir, else an RDB URL
    max_retries: int = 2
    job: dict = field(default_factory=dict)  # nodes, gpus_per_node, tasks_per_node, ... (SLURM resources)

    @classmethod
    def load(cls, sweep_dir: Path) -> "SweepSettings":
        path = sweep_dir / SETTINGS_NAME
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise SweepError(f"{path}: cannot read the sweep settings ({error})") from None


def write_json_atomic(path: Path, data: object) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def open_storage(settings: SweepSettings) -> optuna.storages.BaseStorage:
    if settings.storage:
        return optuna.storages.RDBStorage(settings.storage, engine_kwargs={"pool_pre_ping": True})
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    journal = str(Path(settings.sweep_dir) / JOURNAL_NAME)
    return optuna.storages.JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal)))


@contextlib.contextmanager
def assignment_lock(sweep_dir: Path):
    """Serialises trial creation and retries across all jobs and the driver (same O_EXCL lock as the journal)."""
    from optuna.storages.journal import JournalFileOpenLock
    lock = JournalFileOpenLock(str(sweep_dir / "assign"), grace_period=120)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def load_study(settings: SweepSettings, space: SearchSpace, trial_number: int = 0) -> optuna.Study:
    n_epochs = load_config(settings.config, settings.overrides).training.n_epochs
    return optuna.load_study(study_name=settings.study_name, storage=open_storage(settings),
                             sampler=space.sampler(trial_number), pruner=space.pruner(n_epochs))


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / "trials" / f"trial-{number:04d}"


# ------------------------------------------------------------------------------------------------ trial accounting
def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of failed trials that have a retry (those no longer count toward the budget)."""
    return {number for t in trials
            if (number := optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)) is not None}


def finished_count(trials: list[optuna.trial.FrozenTrial]) -> int:
    retried = retried_numbers(trials)
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or
               (t.state == TrialState.FAIL and t.number not in retried) for t in trials)


def budget_used(trials: list[optuna.trial.FrozenTrial]) -> int:
    return finished_count(trials) + sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)


# ------------------------------------------------------------------------------------------------ job identity
def current_owner() -> str:
    """This job's (or local process's) name as a trial owner; stable across requeues of the same SLURM job."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"slurm-{array_job}_{array_task}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return f"local-{socket.gethostname()}-{os.getpid()}"


def slurm_states(job_ids: list[str]) -> dict[str, str | None]:
    """job id -> Slurm state, or None when Slurm could not be asked (then nobody is declared dead)."""
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


def owners_alive(owners: list[str]) -> dict[str, bool | None]:
    """owner -> True (job exists, maybe requeued and pending), False (gone) or None (cannot tell from here)."""
    result: dict[str, bool | None] = {}
    slurm_owners = [o for o in owners if o.startswith("slurm-")]
    states = slurm_states([o[len("slurm-"):] for o in slurm_owners])
    for owner in slurm_owners:
        state = states.get(owner[len("slurm-"):])
        result[owner] = None if state is None else state in ALIVE_SLURM_STATES
    host = socket.gethostname()
    for owner in owners:
        if owner.startswith("local-"):
            owner_host, _, pid = owner[len("local-"):].rpartition("-")
            if owner_host != host:
                result[owner] = None
                continue
            try:
                cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
                result[owner] = b"csi_dist.sweep" in cmdline
            except (OSError, ValueError):
                result[owner] = False
    return result


# ------------------------------------------------------------------------------------------------ the trial job
def assign_trial(settings: SweepSettings, space: SearchSpace, owner: str) -> dict | None:
    """Rank 0: the trial this job runs, resumed (a requeued job) or new; None when the study needs no more trials."""
    sweep_dir = Path(settings.sweep_dir)
    with assignment_lock(sweep_dir):
        trials = load_study(settings, space).get_trials(deepcopy=False)
        for t in trials:
            if t.state == TrialState.RUNNING and t.user_attrs.get("owner") == owner:
                log.info("job %s resumes its trial %d", owner, t.number)
                return {"number": t.number, "trial_id": t._trial_id, "overrides": t.user_attrs["overrides"],
                        "resumed": True}
        retry_waiting = any(t.state == TrialState.WAITING for t in trials)  # ask() takes it first
        if not retry_waiting and budget_used(trials) >= settings.n_trials:
            return None
        # The trial about to be created gets number len(trials): seed the sampler by it (see sweep_space).
        study = load_study(settings, space, trial_number=len(trials))
        trial = study.ask()
        overrides = space.suggest(trial)
        run_dir = trial_dir(sweep_dir, trial.number)
        for key, value in {"owner": owner, "overrides": overrides, "run_dir": str(run_dir), "requeues": 0}.items():
            trial.set_user_attr(key, value)
        retry_of = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(
            study._storage.get_trial(trial._trial_id))
    if retry_of is not None and not (run_dir / "checkpoints").exists():
        source = trial_dir(sweep_dir, retry_of) / "checkpoints"
        if source.is_dir():  # the dead job's progress is not thrown away
            shutil.copytree(source, run_dir / "checkpoints")
            log.info("trial %d retries trial %d from its checkpoints", trial.number, retry_of)
    log.info("job %s runs trial %d: %s", owner, trial.number, overrides)
    return {"number": trial.number, "trial_id": trial._trial_id, "overrides": overrides, "resumed": False}


def share_assignment(sweep_dir: Path, owner: str, rank: int, world_size: int, assignment: dict | None,
                     timeout_s: float = 600) -> dict | None:
    """Rank 0's assignment to every rank of the job, through a file (no process group exists yet)."""
    if world_size == 1:
        return assignment
    segment = os.environ.get("SLURM_RESTART_COUNT", "0")
    path = sweep_dir / "assignments" / f"{owner}.{segment}.json"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"assignment": assignment})
        return assignment
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise SweepError(f"rank {rank}: rank 0 wrote no trial assignment to {path} within {timeout_s:.0f} s")
        time.sleep(0.5)
    return json.loads(path.read_text(encoding="utf-8"))["assignment"]


def best_objective(run_dir: Path, key: str, direction: str) -> float:
    history = json.loads((run_dir / "training_history.json").read_text(encoding="utf-8"))
    values = [record[key] for record in history
              if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])]
    if not values:
        raise SweepError(f"{run_dir}/training_history.json: no finite {key} in any evaluation")
    return max(values) if direction == "maximize" else min(values)


def run_trial(sweep_dir: Path, owner: str, rank: int = 0, world_size: int = 1) -> dict | None:
    """Run (or resume) one trial in this job; all ranks call it. Returns the trial's outcome on rank 0."""
    settings = SweepSettings.load(sweep_dir)
    space = load_space(settings.space)
    assignment = assign_trial(settings, space, owner) if rank == 0 else None
    assignment = share_assignment(sweep_dir, owner, rank, world_size, assignment)
    if assignment is None:
        log.info("the study already has its %d trials: nothing for job %s to do", settings.n_trials, owner)
        return None
    import torch
    from csi_dist.train import train

    number, overrides = assignment["number"], assignment["overrides"]
    run_dir = trial_dir(sweep_dir, number)
    config = load_config(settings.config, [*settings.overrides, *(f"{k}={v}" for k, v in overrides.items()),
                                           f"logging.wandb_group={settings.study_name}"])
    direction = space.study_direction()
    study = trial = None
    if rank == 0:
        study = load_study(settings, space)
        trial = optuna.trial.Trial(study, assignment["trial_id"])
    pruned_at: list[int] = []

    def report_and_decide(record: dict, accelerator) -> bool:
        prune = False
        if accelerator.is_main_process:
            value = record.get(space.history_key)
            if value is None:
                raise SweepError(f"trial {number}: the history record has no {space.history_key}; objective "
                                 f"{space.objective!r} must be a validation metric (keys: {sorted(record)})")
            trial.report(float(value), step=int(record["epoch"]))
            # pruning after the last epoch would save nothing and only hide a finished trial's value
            prune = int(record["epoch"]) + 1 < config.training.n_epochs and trial.should_prune()
        if accelerator.num_processes > 1:
            flag = torch.tensor([int(prune)], device=accelerator.device)
            torch.distributed.broadcast(flag, src=0)
            prune = bool(flag.item())
        if prune:
            pruned_at.append(int(record["epoch"]))
            log.info("trial %d pruned after epoch %d", number, record["epoch"])
        return prune

    def fail(reason: str) -> None:
        if rank == 0:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason[-2000:])
            study.tell(trial, state=TrialState.FAIL)

    try:
        status = train(config, run_dir, "auto", epoch_end_hook=report_and_decide)
    except SystemExit as stop:
        if stop.code == EXIT_PREEMPTED and rank == 0:  # checkpointed and requeued: same trial, next segment
            requeues = study._storage.get_trial(trial._trial_id).user_attrs.get("requeues", 0) + 1
            study._storage.set_trial_user_attr(trial._trial_id, "requeues", requeues)
            log.warning("trial %d interrupted (%d time(s)); the requeued job resumes it", number, requeues)
        elif rank == 0:
            fail(f"training exited with status {stop.code}")
        raise
    except Exception as error:
        fail(f"{type(error).__name__}: {error}")
        raise
    if rank != 0:
        return None
    if status != 0:
        fail(f"training exited with status {status}")
        return {"number": number, "state": "FAIL"}
    if pruned_at:
        study.tell(trial, state=TrialState.PRUNED)
        return {"number": number, "state": "PRUNED"}
    try:
        value = best_objective(run_dir, space.history_key, direction)
    except SweepError as error:
        fail(str(error))
        return {"number": number, "state": "FAIL"}
    study.tell(trial, value)
    log.info("trial %d complete: %s = %.6f", number, space.history_key, value)
    return {"number": number, "state": "COMPLETE", "value": value}


class TrialTask:
    """A submitit job (every task = one rank): the job's torch.distributed environment, then run_trial()."""

    def __init__(self, sweep_dir: str, use_gpus: bool):
        self.sweep_dir = sweep_dir
        self.use_gpus = use_gpus

    def __call__(self) -> dict | None:
        import submitit
        job = submitit.JobEnvironment()
        # as csi_dist.submit.TrainingTask: a port per job segment, torch.distributed variables from the job
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        job_number = int(os.environ.get("SLURM_JOB_ID", str(job.job_id).split("_")[0]))
        os.environ.setdefault("MASTER_PORT", str(20000 + (job_number % 4000) * 10 + restart % 10))
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=self.use_gpus, overwrite=True)
        if not self.use_gpus:
            os.environ["ACCELERATE_USE_CPU"] = "1"
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        return run_trial(Path(self.sweep_dir), current_owner(), rank=job.global_rank, world_size=job.num_tasks)

    def checkpoint(self, *args, **kwargs):
        """submitit's notice handler (only until the trainer installs its own): rerun; the trial resumes."""
        import submitit
        return submitit.helpers.DelayedSubmission(self)


# ------------------------------------------------------------------------------------------------ the driver
def recover_dead_trials(settings: SweepSettings, space: SearchSpace, suspects: dict[int, float],
                        grace_s: float) -> None:
    """Fail (and retry) RUNNING trials whose job has been gone for `grace_s`; requeued (pending) jobs are alive."""
    sweep_dir = Path(settings.sweep_dir)
    study = load_study(settings, space)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    alive = owners_alive(sorted({t.user_attrs.get("owner", "") for t in running} - {""}))
    now = time.monotonic()
    for t in running:
        owner = t.user_attrs.get("owner")
        state = alive.get(owner) if owner else False
        if state is None or state:
            suspects.pop(t.number, None)
            continue
        if now - suspects.setdefault(t.number, now) < grace_s:
            continue
        with assignment_lock(sweep_dir):
            current = study._storage.get_trial(t._trial_id)
            if current.state != TrialState.RUNNING:
                continue
            reason = f"job {owner or '(none recorded)'} ended without reporting (cancelled, node failure or crash)"
            log.warning("trial %d: %s; marking it failed", t.number, reason)
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            study.tell(t.number, state=TrialState.FAIL)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retries, inherit_intermediate_values=True)(
                study, study._storage.get_trial(t._trial_id))
        suspects.pop(t.number, None)


def read_jobs(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / JOBS_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def record_jobs(sweep_dir: Path, new_jobs: list[dict]) -> None:
    write_json_atomic(sweep_dir / JOBS_NAME, read_jobs(sweep_dir) + new_jobs)


def slurm_executor(settings: SweepSettings, n_jobs: int):
    import submitit
    resources = settings.job
    executor = submitit.AutoExecutor(folder=Path(settings.sweep_dir) / "submitit" / "%j", cluster="slurm")
    gpus = int(resources.get("gpus_per_node") or 0)
    parameters = dict(name=f"sweep-{settings.study_name}", nodes=resources.get("nodes", 1),
                      tasks_per_node=resources.get("tasks_per_node") or max(gpus, 1),
                      timeout_min=resources.get("timeout_min", 24 * 60),
                      slurm_array_parallelism=min(settings.parallel, n_jobs),
                      slurm_signal_delay_s=120, slurm_additional_parameters={"requeue": True})
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


def create_or_resume(args: argparse.Namespace) -> SweepSettings:
    """First start: validate and write sweep.json + the space copy + the study. Restart: check it is the same sweep."""
    sweep_dir = args.sweep_dir.resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    config = str(args.config.resolve()) if args.config else None
    job = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "tasks_per_node": args.tasks_per_node,
           "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb, "partition": args.partition,
           "timeout_min": args.timeout_min}
    settings_path = sweep_dir / SETTINGS_NAME
    if settings_path.exists():
        settings = SweepSettings.load(sweep_dir)
        space_text = args.space.read_text(encoding="utf-8") if args.space else None
        mismatches = [name for name, given, stored in (
            ("--config", config, settings.config), ("--set", args.overrides, settings.overrides),
            ("--study-name", args.study_name or settings.study_name, settings.study_name),
            ("--storage", args.storage, settings.storage),
            ("--space", space_text, Path(settings.space).read_text(encoding="utf-8") if space_text else None))
            if given != stored]
        if mismatches:
            raise SweepError(f"{settings_path}: this sweep dir holds a study started with other {', '.join(mismatches)}"
                             f"; restart with the same values or use another --sweep-dir")
        settings.n_trials, settings.parallel, settings.executor = args.n_trials, args.parallel, args.executor
        settings.max_retries, settings.job = args.max_retries, job
        log.info("resuming study %r in %s", settings.study_name, sweep_dir)
    else:
        if args.space is None:
            raise SweepError("--space is required to start a sweep (e.g. configs/sweep/default.yaml)")
        space = load_space(args.space)
        space.check_against_config(args.config, args.overrides)
        space_copy = sweep_dir / f"space{args.space.suffix}"
        shutil.copyfile(args.space, space_copy)
        settings = SweepSettings(sweep_dir=str(sweep_dir), study_name=args.study_name or sweep_dir.name,
                                 config=config, overrides=list(args.overrides), space=str(space_copy),
                                 n_trials=args.n_trials, parallel=args.parallel, executor=args.executor,
                                 storage=args.storage, max_retries=args.max_retries, job=job)
    space = load_space(settings.space)
    optuna.create_study(study_name=settings.study_name, storage=open_storage(settings),
                        direction=space.study_direction(), load_if_exists=True)
    write_json_atomic(settings_path, asdict(settings))
    import yaml
    (sweep_dir / "wandb_sweep.yaml").write_text(yaml.safe_dump(
        wandb_sweep(space, args.config, settings.overrides, settings.n_trials), sort_keys=False), encoding="utf-8")
    return settings


def drive(settings: SweepSettings, wait: bool, poll_s: float, dead_grace_s: float, timeout_min: float) -> int:
    from csi_dist.sweep_report import write_report
    space = load_space(settings.space)
    suspects: dict[int, float] = {}
    deadline = time.monotonic() + timeout_min * 60 if timeout_min else math.inf
    while True:
        recover_dead_trials(settings, space, suspects, dead_grace_s)
        trials = load_study(settings, space).get_trials(deepcopy=False)
        done = finished_count(trials)
        if done >= settings.n_trials:
            break
        active = launch_missing_jobs(settings, space)
        if not wait:
            log.info("%d/%d trials finished; jobs run on without this driver (rerun it to collect the report)",
                     done, settings.n_trials)
            return 0
        if time.monotonic() > deadline:
            log.error("%d/%d trials finished after --wait-timeout-min %s; jobs go on, rerun to continue",
                      done, settings.n_trials, timeout_min)
            return 1
        log.info("%d/%d trials finished, %d job(s) active", done, settings.n_trials, active)
        time.sleep(poll_s)
    write_report(load_study(settings, space), settings, space)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="csi_dist.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="base training config (INI)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="fixed override for every trial (repeatable)")
    parser.add_argument("--space", type=Path, help="search space (.yaml/.yml or .ini), e.g. configs/sweep/default.yaml")
    parser.add_argument("--n-trials", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=4, help="trials running at the same time")
    parser.add_argument("--executor", choices=("slurm", "local"), default="slurm")
    parser.add_argument("--sweep-dir", type=Path, help="on the shared filesystem (default sweeps/<study name>)")
    parser.add_argument("--study-name", default=None, help="default: the sweep dir's name")
    parser.add_argument("--storage", default="", help="RDB URL for large sweeps (default: journal file in the sweep dir)")
    parser.add_argument("--max-retries", type=int, default=2, help="retries of a trial whose job died")
    parser.add_argument("--nodes", type=int, default=1, help="per trial")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="per trial; 0 = train on CPU")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU, or 1")
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--mem-gb", type=float, default=None)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--timeout-min", type=int, default=24 * 60, help="time limit of each trial job")
    parser.add_argument("--no-wait", action="store_true", help="submit and exit (SLURM); rerun later for the report")
    parser.add_argument("--wait-timeout-min", type=float, default=0, help="stop waiting after this long (0 = never)")
    parser.add_argument("--poll-s", type=float, default=10.0)
    parser.add_argument("--dead-grace-s", type=float, default=60.0,
                        help="a trial's job must be gone this long before the trial is failed and retried")
    parser.add_argument("--run-trial", action="store_true", help=argparse.SUPPRESS)  # a local trial process
    args = parser.parse_args(argv)
    if args.sweep_dir is None:
        if args.run_trial:
            parser.error("--run-trial needs --sweep-dir")
        args.sweep_dir = Path("sweeps") / (args.study_name or "csi-sweep")
    if args.n_trials < 1 or args.parallel < 1:
        parser.error("--n-trials and --parallel must be >= 1")
    if args.executor == "local" and (args.nodes != 1 or (args.tasks_per_node or 1) != 1):
        parser.error("--executor local runs each trial as one process: use --executor slurm for multi-process trials")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = parse_args(argv)
    try:
        if args.run_trial:
            run_trial(args.sweep_dir.resolve(), current_owner())
            return 0
        settings = create_or_resume(args)
        return drive(settings, wait=not args.no_wait or args.executor == "local", poll_s=args.poll_s,
                     dead_grace_s=args.dead_grace_s, timeout_min=args.wait_timeout_min)
    except (ConfigError, SweepError) as error:
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    # Through the import name, so that submitit pickles csi_dist.sweep.TrialTask by reference, not __main__'s copy.
    from csi_dist.sweep import main as sweep_main
    sys.exit(sweep_main())
