"""The run directory a training starts in: it continues the run the directory holds, or starts one where none is.

One directory, one run: its checkpoints, weights, history and lineage (provenance.json) are never shared with
another run. `--resume auto` continues the run there (or starts one); `--resume never` starts a new run and refuses
a directory that already holds one (exit 2, saying how to start over); `--resume fresh` first moves that run aside,
whole, to a dated sibling folder (nothing is deleted), then starts a new run in an empty directory. A requeued SLURM
job reruns its command line: a directory whose run this very job started (its provenance names the job) is continued,
whatever `--resume` says, so a requeue never refuses or moves aside its own run. A finished run stays finished: run
again (a requeue, a sweep, the same command), it says it is complete and trains and writes nothing.
"""
from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from csi_dist.core.config import ConfigError
from csi_dist.core.provenance import read_provenance
from csi_dist.core.run_dir import MOVED_ASIDE, RUN_CONTENTS, RunDir

log = logging.getLogger("csi_dist.train")

FRESH = "fresh"


def run_contents(run_dir: Path) -> list[str]:
    """The parts of a run `run_dir` holds (empty when it holds none): run_dir.RUN_CONTENTS, a folder when not empty."""
    found = []
    for name in RUN_CONTENTS:
        path = Path(run_dir) / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def started_by_this_job(run_dir: Path, environ: Mapping[str, str]) -> bool:
    """True when the run in `run_dir` was started (or continued) by this SLURM job: this start is its requeue."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        segments = read_provenance(run_dir).get("segments", [])
    except (OSError, ValueError):  # unreadable: not provably ours
        return False
    return any(str(segment.get("slurm_job_id")) == job for segment in segments)


def plan_start(run_dir: Path, resume: str, environ: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """(the resume the trainer runs with, whether the run there must first be moved aside) for `--resume resume`.

    Raises ConfigError for `--resume never` on a directory that holds a run.
    """
    if resume not in ("never", FRESH):
        return resume, False
    held = run_contents(run_dir)
    if not held:
        return "never", False
    if started_by_this_job(run_dir, environ):
        log.info("%s holds the run this SLURM job (%s) started: a requeue continues it (--resume %s applies to the "
                 "job's first start only)", run_dir, environ["SLURM_JOB_ID"], resume)
        return "auto", False
    if resume == FRESH:
        return "never", True
    raise ConfigError(f"{run_dir} already holds a run ({', '.join(held)}); --resume never does not mix a new run into "
                      f"it. To continue that run: --resume auto (the default). To start over: a new --run-dir, or "
                      f"--resume fresh (moves the old run aside to a dated folder {run_dir.name}{MOVED_ASIDE}<date> "
                      f"beside it, nothing deleted, and starts the new run in an empty {run_dir})")


def moved_aside_name(run_dir: Path, now: datetime) -> Path:
    """A dated sibling folder no other folder has: <name>.old-YYYYmmdd-HHMMSS[-N] (RunDir.moved_aside)."""
    number = 1
    while RunDir(run_dir).moved_aside(now, number).exists():
        number += 1
    return RunDir(run_dir).moved_aside(now, number)


def move_run_aside(run_dir: Path) -> Path:
    """Rename the whole run directory to a dated sibling (one rename: nothing is copied, nothing deleted)."""
    target = moved_aside_name(run_dir, datetime.now())
    try:
        run_dir.rename(target)
    except OSError as error:
        raise ConfigError(f"--resume fresh: cannot move the run in {run_dir} aside to {target}: {error}") from None
    log.warning("moved the run in %s aside to %s (nothing deleted); a new run starts in %s", run_dir, target, run_dir)
    return target


def start_run_directory(run_dir: Path, resume: str, accelerator) -> str:
    """Every rank: decide how this run starts (plan_start); rank 0 moves an old run aside when asked. Returns the
    resume the trainer runs with ("auto", "never" or a checkpoint path)."""
    resume, move_aside = plan_start(run_dir, resume)  # every rank reads the directory before anyone changes it
    if move_aside:
        import torch
        accelerator.wait_for_everyone()
        failure = None
        if accelerator.is_main_process:
            try:
                move_run_aside(run_dir)
            except ConfigError as error:
                failure = error
        failed = torch.tensor(int(failure is not None), device=accelerator.device)
        if int(accelerator.reduce(failed, reduction="sum").item()):  # every rank stops, not rank 0 alone
            raise failure or ConfigError(f"--resume fresh: rank 0 could not move the run in {run_dir} aside")
    return resume


def finished_because(run_dir: Path, state: dict, n_epochs: int, max_steps: int, patience: int) -> str | None:
    """Why the run in `run_dir`, whose newest checkpoint holds the trainer state `state`, is finished under these
    settings (all epochs trained, training.max_steps reached, early stopped), or None: it has more to train, or its
    end was never recorded (provenance: a kill after its last checkpoint, before its weights; the rerun ends it)."""
    try:
        segments = read_provenance(run_dir).get("segments") or [{}]
    except (OSError, ValueError):
        return None
    ended = segments[-1].get("finished") and segments[-1].get("end_step") == state.get("global_step")
    if not ended or not RunDir(run_dir).last_weights.is_file():
        return None
    if state.get("epoch", 0) >= n_epochs:
        return f"all {n_epochs} epoch(s) trained"
    if max_steps and state.get("global_step", 0) >= max_steps:
        return f"training.max_steps = {max_steps} reached"
    if patience and state.get("early_stopping", {}).get("evaluations_without_improvement", 0) >= patience:
        return f"early stopped: {patience} evaluation(s) without improvement"
    return None


def outcome_lines(run_dir: Path) -> list[str]:
    """Where a run's weights are and what to run next: the end of a training, or of a rerun of a finished one."""
    paths, run = RunDir(run_dir), shlex.quote(str(run_dir))
    best, last = paths.best_weights, paths.last_weights
    where = f"weights: {best} (best, what evaluate and predict load), {last} (last)" \
        if best.is_file() else f"weights: {last} (no best weights: evaluate and predict load it)"
    return [where, f"next: python -m csi_dist.evaluate --run-dir {run}; python -m csi_dist.predict --run-dir {run} "
                   f"--images DIR"]
