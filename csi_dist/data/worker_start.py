"""Imported once by the fork server of the DataLoader workers (see csi_dist.data.workers), never by a rank.

It makes the fork server, and so every worker forked from it, ignore the signals the rank treats as a notice to
stop, and imports what a worker runs, so that a new worker starts in milliseconds.
"""
from __future__ import annotations

import signal

import csi_dist.data.reader  # noqa: F401 - a worker's code, imported once in the fork server
import csi_dist.data.transforms  # noqa: F401

for _notice in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(_notice, signal.SIG_IGN)
