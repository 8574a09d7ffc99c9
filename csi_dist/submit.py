"""Submit training to SLURM with submitit (or run it locally with --local); requeued jobs resume by themselves.

    python -m csi_dist.submit --nodes 2 --gpus-per-node 4 --config configs/demo.ini --run-dir runs/demo
    python -m csi_dist.submit --local --tasks-per-node 2 --config configs/demo.ini --set training.n_epochs=1

Options this launcher does not know are passed to the trainer (`csi_dist.train`) unchanged. Every task is one
training process: it exports the torch.distributed environment of its place in the job and calls
`csi_dist.train.main(argv)`. On a preemption notice the trainer checkpoints and requeues the job (see
csi_dist/cluster/preemption.py); the requeued job runs the same argv, whose `--run-dir` is fixed here at submission
time, and `--resume auto` continues from the newest complete checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import submitit

from csi_dist.cluster.jobs import submitit_parameters_for_run
from csi_dist.cluster.slurm import export_rendezvous_port
from csi_dist.core.command import skip_final_collections
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR

log = logging.getLogger("csi_dist.submit")


class TrainingTask:
    """One rank of a submitted training: distributed environment from the job, then the trainer's main()."""

    def __init__(self, trainer_argv: list[str], use_gpus: bool):
        self.trainer_argv = trainer_argv
        self.use_gpus = use_gpus

    def __call__(self) -> int:
        export_rendezvous_port()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=self.use_gpus,
                                                              overwrite=True)
        if not self.use_gpus:
            os.environ["ACCELERATE_USE_CPU"] = "1"
        from csi_dist.train import main  # imported in the job: the submitting machine needs no torch setup

        try:
            status = main(self.trainer_argv)
        finally:
            skip_final_collections()  # the job's process ends with this task
        if status != 0:  # the trainer's own code leaves the task, so the batch script's requeue rule can read it
            raise SystemExit(status)
        return status

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit's own notice handler (active only before the trainer installs its watcher): rerun as is."""
        return submitit.helpers.DelayedSubmission(self)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="csi_dist.submit", description=__doc__.splitlines()[0],
                                     epilog="Other options (--config, --set, --resume, ...) go to the trainer, "
                                            "`python -m csi_dist.train` (see its --help). Without --run-dir the run "
                                            "goes to runs/<job name>-<date>_<time>, fixed at submission so that every "
                                            "requeue of the job continues it.")
    parser.add_argument("--nodes", type=int, default=1, help="machines (default: 1)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per machine (default: 0, train on CPU)")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="training processes per machine (default: one per GPU, or 1 on CPU)")
    parser.add_argument("--cpus-per-task", type=int, default=None,
                        help="CPU cores per training process (default: SLURM's, usually 1)")
    parser.add_argument("--mem-gb", type=float, default=None,
                        help="memory per machine in GB (default: SLURM's for the partition)")
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default partition)")
    parser.add_argument("--timeout-min", type=int, default=24 * 60,
                        help="the job's time limit in minutes (default: 1440, a day); a requeued job gets it again")
    parser.add_argument("--job-name", default="csi-train", help="SLURM job name (default: csi-train)")
    parser.add_argument("--log-dir", type=Path, default=Path("logs/submitit"),
                        help="where the job's logs and submission files go (default: logs/submitit)")
    parser.add_argument("--local", action="store_true",
                        help="run on this machine instead of SLURM (default: off, submit to SLURM)")
    parser.add_argument("--wait", action="store_true",
                        help="wait for the job and exit with its status (default: off, exit once submitted)")
    return parser.parse_known_args(argv)


def run_dir_of(trainer_argv: list[str]) -> Path | None:
    """The trainer's --run-dir, or None when its arguments name none."""
    for position, arg in enumerate(trainer_argv):
        if arg == "--run-dir" and position + 1 < len(trainer_argv):
            return Path(trainer_argv[position + 1])
        if arg.startswith("--run-dir="):
            return Path(arg.split("=", 1)[1])
    return None


def with_fixed_run_dir(trainer_argv: list[str], job_name: str) -> list[str]:
    """The trainer's argv with an explicit --run-dir, so that every requeue of the job finds the same run."""
    if run_dir_of(trainer_argv) is not None:
        return trainer_argv
    return [*trainer_argv, "--run-dir", str(Path("runs") / f"{job_name}-{datetime.now():%Y%m%d_%H%M%S}")]


def build_executor(args: argparse.Namespace, run_dir: Path) -> submitit.Executor:
    tasks_per_node = args.tasks_per_node or max(args.gpus_per_node, 1)
    if args.local:
        if args.nodes != 1:
            raise SystemExit(f"--local runs on one machine: --nodes must be 1, got {args.nodes}")
        executor = submitit.AutoExecutor(folder=args.log_dir, cluster="local")
    else:
        executor = submitit.AutoExecutor(folder=args.log_dir, cluster="slurm")
    parameters = dict(name=args.job_name, nodes=args.nodes, tasks_per_node=tasks_per_node,
                      timeout_min=args.timeout_min)
    if args.gpus_per_node:
        parameters["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        parameters["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb:
        parameters["mem_gb"] = args.mem_gb
    if not args.local:
        # the notice, --requeue and the after-step teardown of every csi_dist job (csi_dist/cluster/jobs.py)
        parameters.update(submitit_parameters_for_run(run_dir))
        if args.partition:
            parameters["slurm_partition"] = args.partition
    executor.update_parameters(**parameters)
    return executor


def trainer_config_error(trainer_argv: list[str]) -> str | None:
    """What the trainer would refuse in its arguments or config (the message naming file, key and line), checked
    here so that a typo costs a second, not a place in the queue; None when they are valid."""
    from csi_dist.core.config import ConfigError
    from csi_dist.train import config_and_run_dir, parse_args as parse_trainer_args
    try:
        config_and_run_dir(parse_trainer_args(trainer_argv))
    except ConfigError as error:
        return str(error)
    except SystemExit:  # argparse has printed the trainer's usage error
        return "the trainer's arguments are not valid (see above)"
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args, trainer_argv = parse_args(argv)
    trainer_argv = with_fixed_run_dir(trainer_argv, args.job_name)
    refused = trainer_config_error(trainer_argv)
    if refused:
        log.error("nothing submitted: %s", refused)
        return EXIT_CONFIG_ERROR
    executor = build_executor(args, run_dir_of(trainer_argv))
    job = executor.submit(TrainingTask(trainer_argv, use_gpus=args.gpus_per_node > 0))
    print(f"submitted job {job.job_id}")
    print(f"log: {job.paths.stdout}")
    print(f"trainer arguments: {' '.join(trainer_argv)}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    try:
        job.results()
    except Exception as error:  # submitit re-raises the task's failure; its log has the traceback
        log.error("job %s failed: %s", job.job_id, error)
        return 1
    print(f"job {job.job_id} finished")
    return 0


if __name__ == "__main__":
    # Run through the module's import name so that submitit pickles `csi_dist.submit.TrainingTask` by
    # reference, not the class from `__main__` by value.
    from csi_dist.submit import main as submit_main
    sys.exit(submit_main())
