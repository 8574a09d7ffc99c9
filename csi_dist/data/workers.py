"""Where DataLoader workers come from: a fork server, never a fork of the rank itself.

A rank is multi-threaded by the time it builds a loader (the process group's threads, TensorBoard's writer, queue
feeder threads of the previous loader). A worker forked from it inherits every lock another thread held at that
moment, and one that needs such a lock waits forever: the rank then waits for its batch, the other ranks in their
next collective, and the job hangs without a word (seen once in CI at the end of a resumed epoch; Python 3.12
warns "use of fork() may lead to deadlocks in the child"). Workers are therefore forked by Python's fork server, a small
single-threaded process each rank starts once. It has imported the reader already, never reruns the parent's main
module in a worker, and ignores the stop signals (csi_dist.data.worker_start): SLURM, `timeout` and Ctrl-C signal
every process of a step, and a worker that died of it would raise in its rank at an arbitrary point (even inside
optimizer.step), before the rank could save. The rank takes the stop decision and ends its workers through the
loader's normal shutdown; a worker whose rank is killed exits at once (`start_worker`). torch gives each worker a
SIGTERM handler of its own that ends it, before our init (`start_worker`, every loader's worker_init_fn) turns SIGTERM
off again: the fork server therefore also blocks the notices, so one that arrives in between waits, and is dropped
when `start_worker` ignores it.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import select
import signal
import threading

WORKER_START_MODULE = "csi_dist.data.worker_start"


STOP_NOTICES = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # what the rank treats as "stop"


def ignore_stop_notices() -> None:
    for notice in STOP_NOTICES:
        signal.signal(notice, signal.SIG_IGN)


def hold_stop_notices() -> None:
    """Block the notices (in the fork server: every worker starts with them blocked, see the module's docstring)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_NOTICES)


def worker_options(num_workers: int) -> dict:
    """The DataLoader arguments of a loader built in this process (the rank) with `num_workers` workers: they come
    from the fork server and run `start_worker` first."""
    if num_workers == 0:
        return {}
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([WORKER_START_MODULE])
    return {"multiprocessing_context": context, "worker_init_fn": functools.partial(start_worker, os.getpid())}


def start_worker(rank_pid: int, worker_id: int) -> None:
    """A DataLoader worker's init: ignore the notices (torch's worker start installs a SIGTERM handler that exits),
    and end with the rank. torch's own watchdog watches the worker's parent, which is the fork server here; and the
    fork server lives as long as any of its children (each holds its "alive" pipe), so after a rank is killed its
    workers would wait for each other forever, holding the job step's output open (SLURM then waits 60 s to end the
    step, and a node's processes pile up)."""
    ignore_stop_notices()  # a notice held back since the worker started is dropped here, unseen
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_NOTICES)
    threading.Thread(target=_exit_when_ended, args=(rank_pid,), name="rank-watch", daemon=True).start()


def _exit_when_ended(rank_pid: int) -> None:
    try:
        ended = os.pidfd_open(rank_pid)  # readable once the process has ended (reaped or not)
    except ProcessLookupError:
        os._exit(0)
    select.select([ended], [], [])
    os._exit(0)
