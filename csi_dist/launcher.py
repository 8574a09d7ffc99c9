"""Start this node's ranks as `accelerate launch` would, and end as they did: exit 75 after a notice, no traceback.

    python -m csi_dist.launcher --config_file launch/accelerate/ddp.yaml [--num_processes N ...] -m csi_dist.train ...
    csi-launch ...                                       (the same, as a console script)

Options and config files are `accelerate launch`'s, read by accelerate's own parser, and each rank gets the
environment accelerate would give it (accelerate.utils.prepare_multi_gpu_env / prepare_deepspeed_cmd_env) plus the
env:// rendezvous variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT; several
nodes: one launcher per node with --machine_rank, --num_machines and --main_process_ip, as with accelerate).

Why not `accelerate launch` itself: it runs torch's elastic agent, which turns a notice into its own SignalException
(the shell reads exit 1 and a traceback after every rank saved and exited 75), SIGKILLs ranks still saving 30 s after
the notice (its `_shutdown(timeout=30)`), and reports a rank's exit 75 as a failed worker (exit 1) even without a
signal. TORCHELASTIC_SIGNALS_TO_HANDLE only chooses which signals raise; no setting changes the rest.

Here the ranks run in sessions of their own (as under torchrun), so a notice to the launcher's process group (Ctrl-C,
`timeout`, `kill -- -PGID`) or to the launcher alone reaches each rank once, passed on by the launcher: TERM, USR1,
USR2 and INT as they are, HUP (the terminal went away) as TERM. The ranks checkpoint and exit 75, however long the
save takes; a second Ctrl-C makes them stop at once without it (the trainer's rule), a third, or a SIGQUIT (Ctrl-\\),
kills them. The launcher then exits 0 when every rank did, 75 when they stopped on a notice (rank 0 has said how to
resume), else with the status of the first rank to fail (128+N for a rank killed by signal N), named in one line.

`--cpu` runs the N ranks on the CPU (gloo), where `accelerate launch --cpu` starts one process. Not supported:
TPU, SageMaker and DeepSpeed's own multi-node runners (pdsh...): run one launcher per node instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.core.command import run_command
from csi_dist.data.workers import STOP_NOTICES

log = logging.getLogger("csi_dist.launcher")

EXIT_USAGE = 2

HELP = """usage: python -m csi_dist.launcher [accelerate launch options] [-m] script_or_module [args]

Start this machine's ranks as `accelerate launch` would, and end as they did.

    python -m csi_dist.launcher --config_file launch/accelerate/ddp.yaml [--num_processes N ...] -m csi_dist.train ...
    csi-launch ...                                       (the same, as a console script)

Options, and their defaults, are those of `accelerate launch --help`. Without --config_file: accelerate's default
config (written by `accelerate config`) if there is one, else one process on this machine, no mixed precision. Each
rank gets the environment accelerate would give it, plus RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and
MASTER_ADDR/PORT as torchrun sets them. Several machines: one launcher per machine, with --machine_rank,
--num_machines and --main_process_ip. `--cpu` runs the N ranks on the CPU. Not supported: TPU, SageMaker and
DeepSpeed's own multi-node runners (pdsh...).

A notice (Ctrl-C, SIGTERM, SIGUSR1, SIGUSR2; SIGHUP counts as SIGTERM) is passed on to each rank once: the ranks
save a checkpoint and stop, however long the save takes. A second Ctrl-C stops them at once without saving; a third,
or Ctrl-\\, kills them.

Exit status: 0 when every rank ended well; 75 when they stopped on a notice (rerun the same command to resume); 2 for
a launch that cannot start as asked; else the status of the first rank to fail (128+N for a rank killed by signal N),
named in one line."""


class UsageError(Exception):
    """A launch this launcher cannot start as asked."""


def missing_config_file(argv: list[str]) -> str | None:
    """The launcher's --config_file when it names no file, else None. The launcher's options are those before the
    script (`-m MODULE`, or the first `.py` file); the script's own arguments are not looked at."""
    for position, arg in enumerate(argv):
        if arg in ("-m", "--module") or arg.endswith(".py"):
            return None
        if arg == "--config_file" and position + 1 < len(argv):
            value = argv[position + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        else:
            continue
        return None if os.path.isfile(value) else value
    return None


def parse_launch(argv: list[str]) -> argparse.Namespace:
    """`accelerate launch`'s arguments, completed from the config file exactly as accelerate completes them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    parser = launch_command_parser()
    parser.prog = "python -m csi_dist.launcher"
    parser.usage = f"{parser.prog} [accelerate launch options] [-m] script_or_module [args]"
    args, defaults, precision_from_config = _validate_launch_command(parser.parse_args(argv))
    if args.tpu or (defaults is not None and defaults.compute_environment != "LOCAL_MACHINE"):
        raise UsageError("TPU and SageMaker launches are not supported here: use `accelerate launch`")
    if args.num_processes % args.num_machines:
        raise UsageError(f"--num_processes {args.num_processes} does not divide over --num_machines "
                         f"{args.num_machines}")
    if args.num_machines > 1 and not args.main_process_ip:
        raise UsageError("several machines need --main_process_ip (the address of machine_rank 0)")
    args.deepspeed_fields_from_accelerate_config = ",".join(  # what accelerate's launch_command hands DeepSpeed
        [*(defaults.deepspeed_config if defaults and args.use_deepspeed else {}),
         *(["mixed_precision"] if precision_from_config else [])])
    return args


def rank_environments(args: argparse.Namespace) -> list[dict[str, str]]:
    """The environment of each of this node's ranks: accelerate's for the config, then the rendezvous variables."""
    from accelerate.utils import (check_cuda_p2p_ib_support, prepare_deepspeed_cmd_env, prepare_multi_gpu_env,
                                  prepare_simple_launcher_cmd_env)
    from accelerate.utils.other import get_free_port
    if args.use_deepspeed:
        args.deepspeed_multinode_launcher = "standard"  # one launcher per node, like torchrun: never pdsh or ssh
        _, environment = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp or args.use_megatron_lm or args.num_processes > 1:
        environment = prepare_multi_gpu_env(args)
    else:  # one process, no process group: accelerate's simple launcher
        _, environment = prepare_simple_launcher_cmd_env(args)
        return [environment]
    if args.cpu:
        environment["ACCELERATE_USE_CPU"] = "true"
    if not check_cuda_p2p_ib_support():  # what accelerate's launchers add for GPUs without P2P (RTX 4000)
        environment.setdefault("NCCL_P2P_DISABLE", "1")
        environment.setdefault("NCCL_IB_DISABLE", "1")
    per_node, machine_rank = args.num_processes // args.num_machines, int(args.machine_rank or 0)
    if per_node < 1:
        raise UsageError(f"--num_processes {args.num_processes}: no process to start on this machine")
    # accelerate leaves a busy port on one machine to torchrun's standalone mode, which takes a free one
    port = get_free_port() if getattr(args, "standalone", False) else args.main_process_port
    shared = {"WORLD_SIZE": str(args.num_processes), "LOCAL_WORLD_SIZE": str(per_node),
              "GROUP_RANK": str(machine_rank), "MASTER_ADDR": str(args.main_process_ip or "127.0.0.1"),
              "MASTER_PORT": str(port),
              "TORCH_NCCL_ASYNC_ERROR_HANDLING": environment.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")}
    if per_node > 1:
        environment.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several processes per node
    return [{**environment, **shared, "LOCAL_RANK": str(local_rank),
             "RANK": str(machine_rank * per_node + local_rank)} for local_rank in range(per_node)]


def rank_command(args: argparse.Namespace) -> list[str]:
    if args.no_python:
        return [args.training_script, *args.training_script_args]
    return [sys.executable, "-u", *(["-m"] if args.module else []), args.training_script,
            *args.training_script_args]


class Ranks:
    """This node's rank processes: each in a session of its own, every notice passed on to each once."""

    def __init__(self, command: list[str], environments: list[dict[str, str]]):
        self.interrupts = 0
        for notice in (*STOP_NOTICES, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(notice, self.pass_on)
        self.processes: list[subprocess.Popen] = []
        # global ranks: on machine_rank 1 of 2 the first process here is rank 2, not rank 0
        self.rank_numbers = [int(environment.get("RANK", local)) for local, environment in enumerate(environments)]
        for environment in environments:
            self.processes.append(subprocess.Popen(command, env=environment, start_new_session=True))

    def running(self) -> list[subprocess.Popen]:
        return [process for process in self.processes if process.returncode is None]

    def pass_on(self, signum: int, frame) -> None:
        self.interrupts += signum == signal.SIGINT
        if signum == signal.SIGQUIT or self.interrupts >= 3:
            notice, send = signal.SIGKILL, os.killpg  # the rank and its DataLoader workers, at once
        else:
            notice, send = (signal.SIGTERM if signum == signal.SIGHUP else signum), os.kill
        for process in self.running():
            try:
                send(process.pid, notice)
            except ProcessLookupError:
                pass  # it ended just now

    def wait(self) -> list[tuple[int, int]]:
        """(rank, return code) in the order the ranks ended; -N for a rank killed by signal N."""
        ended = []
        while self.running():
            pid, wait_status = os.waitpid(-1, 0)  # resumed after each notice (PEP 475)
            for rank, process in zip(self.rank_numbers, self.processes):
                if process.pid == pid:
                    process.returncode = os.waitstatus_to_exitcode(wait_status)
                    ended.append((rank, process.returncode))
        return ended


def launch_status(ended: list[tuple[int, int]]) -> int:
    """0 when every rank ended 0; 75 when they stopped on a notice; else the first failure (128+N for a rank killed
    by signal N), named in one line."""
    failures = [(rank, code) for rank, code in ended if code not in (0, EXIT_PREEMPTED)]
    if failures:
        rank, code = failures[0]
        status = code if code > 0 else 128 - code
        log.error("rank %d was the first to fail, with exit status %d%s; in the order the ranks ended: %s",
                  rank, status, f" (killed by {signal.Signals(-code).name})" if code < 0 else "",
                  ", ".join(f"rank {rank}: {code if code >= 0 else 128 - code}" for rank, code in ended))
        return status
    return EXIT_PREEMPTED if any(code == EXIT_PREEMPTED for _, code in ended) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):  # answered before accelerate (and torch) load
        print(HELP, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config_file = missing_config_file(argv)
    if config_file is not None:  # the most common slip, answered before accelerate (and torch) load
        log.error("--config_file %s: no such file (the shipped ones are in launch/accelerate/)", config_file)
        return EXIT_USAGE
    try:
        args = parse_launch(argv)
        environments = rank_environments(args)
    except (UsageError, ValueError, FileNotFoundError, ConnectionError) as error:
        log.error("%s", error)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    try:
        ranks = Ranks(rank_command(args), environments)
    except OSError as error:  # --no_python with a script that cannot be run
        log.error("cannot start %s: %s", args.training_script, error)
        return EXIT_USAGE
    return launch_status(ranks.wait())


if __name__ == "__main__":
    run_command(main)
