"""Imported once by the fork server of the DataLoader workers (see csi_dist.data.workers), never by a rank.

It makes the fork server, and so every worker forked from it, ignore (and hold back) the signals the rank treats as
a notice to stop; imports what a worker runs, so that a new worker starts in milliseconds, and freezes it out of the
garbage collector; and keeps workers from running the parent's main module again. multiprocessing reruns it in every
child not made by a plain fork (under the name `__mp_main__`), which a script without an `if __name__ == "__main__":`
guard would answer by training again inside each worker (under torchrun: waiting forever for a rendezvous). The
package's workers need nothing from the main module: their dataset, collate and init functions all live in csi_dist
modules, imported by name.
"""
from __future__ import annotations

import gc
import multiprocessing.spawn

import csi_dist.data.unlabelled_images  # noqa: F401 - a worker's code, imported once in the fork server
import csi_dist.data.shards.reader  # noqa: F401
from csi_dist.data.workers import hold_stop_notices, ignore_stop_notices

ignore_stop_notices()
hold_stop_notices()  # until a worker's init, past torch's own SIGTERM handler

# the two steps of multiprocessing's child preparation that rerun the parent's main module (by module name for
# `python -m`, by path for a script): nothing to do for our workers
multiprocessing.spawn._fixup_main_from_name = lambda module_name: None
multiprocessing.spawn._fixup_main_from_path = lambda main_path: None

# What was imported above lives as long as the fork server and its workers: frozen, it is left out of every worker's
# garbage collections (each of which would otherwise walk torch's whole heap, and touch its pages, unsharing them
# from the fork server's) and out of the fork server's last collections when it exits (csi_dist/core/command.py).
gc.collect()
gc.freeze()
