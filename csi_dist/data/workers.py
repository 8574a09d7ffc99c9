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
loader's normal shutdown; a worker whose rank died exits when its fork server does. torch gives each worker a
SIGTERM handler of its own, so `ignore_stop_signals` (every loader's worker_init_fn) turns SIGTERM off again once the
worker runs.
"""
from __future__ import annotations

import multiprocessing
import signal
from multiprocessing.context import BaseContext

WORKER_START_MODULE = "csi_dist.data.worker_start"


def worker_context() -> BaseContext:
    """The multiprocessing context every DataLoader of the package starts its workers with."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([WORKER_START_MODULE])
    return context


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's init: ignore the notices (torch's worker start installs a SIGTERM handler that exits)."""
    for notice in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(notice, signal.SIG_IGN)
