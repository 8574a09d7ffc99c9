"""What runs inside a trial's job: take a trial from the study, train it with pruning, tell the study the outcome.

Every rank of the job runs ``run_trial``: rank 0 takes (or resumes) a trial and shares it with the other ranks, all
of them train, and rank 0 reports each epoch's objective and tells the study COMPLETE, PRUNED or FAIL. ``TrialTask``
is what the driver submits with submitit; a local trial process calls ``run_trial`` through ``--run-trial``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from csi_dist.cluster.slurm import export_rendezvous_port
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.core.command import skip_final_collections
from csi_dist.core.config import load_config
from csi_dist.core.files import atomic_write_json
from csi_dist.core.run_dir import RunDir
from csi_dist.tuning.space import load_space
from csi_dist.tuning.study import SweepError, SweepSettings, assign_trial, current_owner, load_study, trial_dir

log = logging.getLogger("csi_dist.sweep")


def share_assignment(sweep_dir: Path, owner: str, rank: int, world_size: int, assignment: dict | None,
                     timeout_s: float = 600) -> dict | None:
    """Rank 0's assignment to every rank of the job, through a file (no process group exists yet)."""
    if world_size == 1:
        return assignment
    segment = os.environ.get("SLURM_RESTART_COUNT", "0")
    path = sweep_dir / "assignments" / f"{owner}.{segment}.json"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"assignment": assignment})
        return assignment
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise SweepError(f"rank {rank}: rank 0 wrote no trial assignment to {path} within {timeout_s:.0f} s")
        time.sleep(0.5)
    return json.loads(path.read_text(encoding="utf-8"))["assignment"]


def best_objective(run_dir: Path, key: str, direction: str) -> float:
    path = RunDir(run_dir).history
    history = json.loads(path.read_text(encoding="utf-8"))
    values = [record[key] for record in history
              if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])]
    if not values:
        raise SweepError(f"{path}: no finite {key} in any evaluation")
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
    from csi_dist.training.loop import train

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
        export_rendezvous_port()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=self.use_gpus, overwrite=True)
        if not self.use_gpus:
            os.environ["ACCELERATE_USE_CPU"] = "1"
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        try:
            return run_trial(Path(self.sweep_dir), current_owner(), rank=job.global_rank, world_size=job.num_tasks)
        finally:
            skip_final_collections()  # the job's process ends with this trial

    def checkpoint(self, *args, **kwargs):
        """submitit's notice handler (only until the trainer installs its own): rerun; the trial resumes."""
        import submitit
        return submitit.helpers.DelayedSubmission(self)
