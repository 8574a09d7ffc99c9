"""Hyper-parameter sweeps: an Optuna study whose trials are SLURM jobs (or local processes), each a resumable training run.

`python -m csi_dist.sweep`: parse the options, then run the driver (csi_dist/tuning/driver.py: create or resume the
study, start the trial jobs, wait, write the report), or, with the hidden --run-trial, one local trial process
(csi_dist/tuning/trial.py). How a sweep works, its storage and outputs: the driver's docstring.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import optuna

from csi_dist.core.command import run_command
from csi_dist.core.config import ConfigError
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR
# The sweep's library is csi_dist/tuning/: what submitit pickles (TrialTask) is never defined in this __main__ module.
from csi_dist.tuning.driver import create_or_resume, drive
from csi_dist.tuning.study import SweepError, current_owner
from csi_dist.tuning.trial import run_trial

log = logging.getLogger("csi_dist.sweep")


EXECUTOR_HELP = ("where the trials run: slurm (each trial a job of a job array) or local (each trial a process on "
                 "this machine). Default: slurm where this machine can submit jobs (sbatch on PATH and the SLURM "
                 "controller answers `scontrol ping`), otherwise local, so that a laptop sweeps without SLURM; the "
                 "opening summary says which executor runs and why. A restarted sweep keeps the executor it started "
                 "with unless this is given")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="csi_dist.sweep", description=__doc__.splitlines()[0],
                                     epilog="The best parameters are trained with: python -m csi_dist.train --config "
                                            "<config> --hyperparams <sweep dir>/best_params.json")
    parser.add_argument("--config", type=Path, help="base training config (INI) of every trial "
                                                    "(default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a value fixed for every trial (repeatable; default: none)")
    parser.add_argument("--space", type=Path, help="search space (.yaml/.yml or .ini), e.g. "
                                                   "configs/sweep/default.yaml; needed to start a sweep, not to resume it")
    parser.add_argument("--n-trials", type=int, default=50, metavar="N",
                        help="trials in the whole sweep (default: %(default)s)")
    parser.add_argument("--parallel", type=int, default=4, metavar="N",
                        help="trials running at the same time (default: %(default)s)")
    parser.add_argument("--executor", choices=("slurm", "local"), default=None, help=EXECUTOR_HELP)
    parser.add_argument("--sweep-dir", type=Path, help="where the study, trials and report go; on a cluster, on the "
                                                       "shared filesystem (default: sweeps/<--study-name>, else "
                                                       "sweeps/csi-sweep)")
    parser.add_argument("--study-name", default=None, help="default: the sweep dir's name")
    parser.add_argument("--storage", default="", metavar="URL", help="a database URL for very large sweeps, e.g. "
                        "postgresql://user@host/db (default: a journal file in the sweep dir)")
    parser.add_argument("--max-retries", type=int, default=2, metavar="N",
                        help="retries of a trial whose job died (default: %(default)s)")
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes per trial (default: %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=0, metavar="N",
                        help="GPUs per node of a trial; 0 trains on CPU (default: %(default)s)")
    parser.add_argument("--tasks-per-node", type=int, default=None, metavar="N",
                        help="processes per node of a trial (default: one per GPU, or 1)")
    parser.add_argument("--cpus-per-task", type=int, default=None, metavar="N",
                        help="SLURM CPUs per process (default: the cluster's)")
    parser.add_argument("--mem-gb", type=float, default=None, metavar="GB",
                        help="SLURM memory per node (default: the cluster's)")
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    parser.add_argument("--timeout-min", type=int, default=24 * 60, metavar="MIN",
                        help="SLURM time limit of each trial job, in minutes (default: %(default)s, one day)")
    parser.add_argument("--no-wait", action="store_true", help="SLURM: submit the trial jobs and exit; run the same "
                        "command again later for the report (default: wait for the sweep to finish)")
    parser.add_argument("--wait-timeout-min", type=float, default=0, metavar="MIN",
                        help="stop waiting after this many minutes, the jobs go on (default: 0, never)")
    parser.add_argument("--poll-s", type=float, default=10.0, metavar="S",
                        help="seconds between looks at the study and the jobs (default: %(default)g)")
    parser.add_argument("--dead-grace-s", type=float, default=60.0, metavar="S",
                        help="a trial's job must be gone this many seconds before the trial is failed and retried "
                             "(default: %(default)g)")
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
        return drive(settings, wait=not args.no_wait or settings.executor == "local", poll_s=args.poll_s,
                     dead_grace_s=args.dead_grace_s, timeout_min=args.wait_timeout_min)
    except (ConfigError, SweepError) as error:
        log.error("%s", error)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    run_command(main)
