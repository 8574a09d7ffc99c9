"""The study's bookkeeping, shared by the driver and the trial jobs: settings, storage and trial accounting.

Settings (``<sweep-dir>/sweep.json``), the Optuna storage (journal file or RDB) and the assignment lock, the trial
budget, which job owns which trial and whether that job is still alive, trial assignment, the failing and retrying
of trials whose job died, and the list of started jobs (``jobs.json``). How a sweep runs: csi_dist/tuning/driver.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from csi_dist.cluster.slurm import ALIVE_STATES, job_states
from csi_dist.core.config import load_config
from csi_dist.core.files import atomic_write_json
from csi_dist.core.run_dir import RunDir
from csi_dist.tuning.space import SearchSpace

log = logging.getLogger("csi_dist.sweep")
# RetryHeartbeatStaleTrialCallback.retried_trial_number is marked experimental (since Optuna 2.8); it is what we need
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

SETTINGS_NAME = "sweep.json"
JOURNAL_NAME = "optuna_journal.log"
JOBS_NAME = "jobs.json"


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


def owners_alive(owners: list[str]) -> dict[str, bool | None]:
    """owner -> True (job exists, maybe requeued and pending), False (gone) or None (cannot tell from here)."""
    result: dict[str, bool | None] = {}
    slurm_owners = [o for o in owners if o.startswith("slurm-")]
    states = job_states([o[len("slurm-"):] for o in slurm_owners])
    for owner in slurm_owners:
        state = states.get(owner[len("slurm-"):])
        result[owner] = None if state is None else state in ALIVE_STATES
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


# ------------------------------------------------------------------------------------------------ assignment, recovery
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
        # The trial about to be created gets number len(trials): seed the sampler by it (see csi_dist/tuning/space.py).
        study = load_study(settings, space, trial_number=len(trials))
        trial = study.ask()
        overrides = space.suggest(trial)
        run_dir = trial_dir(sweep_dir, trial.number)
        for key, value in {"owner": owner, "overrides": overrides, "run_dir": str(run_dir), "requeues": 0}.items():
            trial.set_user_attr(key, value)
        retry_of = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(
            study._storage.get_trial(trial._trial_id))
    if retry_of is not None and not RunDir(run_dir).checkpoints.exists():
        source = RunDir(trial_dir(sweep_dir, retry_of)).checkpoints
        if source.is_dir():  # the dead job's progress is not thrown away
            shutil.copytree(source, RunDir(run_dir).checkpoints)
            log.info("trial %d retries trial %d from its checkpoints", trial.number, retry_of)
    log.info("job %s runs trial %d: %s", owner, trial.number, overrides)
    return {"number": trial.number, "trial_id": trial._trial_id, "overrides": overrides, "resumed": False}


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


# ------------------------------------------------------------------------------------------------ started jobs
def read_jobs(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / JOBS_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def record_jobs(sweep_dir: Path, new_jobs: list[dict]) -> None:
    atomic_write_json(sweep_dir / JOBS_NAME, read_jobs(sweep_dir) + new_jobs)
