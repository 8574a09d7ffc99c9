"""How the package's processes end: with their exit status, minus the interpreter's last sweeps over the heap that
torch and its companions leave behind."""
from __future__ import annotations

import gc
import sys
from typing import Callable, NoReturn


def skip_final_collections() -> None:
    """Freeze every object alive now out of the cyclic garbage collector; call it when the process's work is done.

    At shutdown CPython looks for cycles again while it tears the modules down, walking every tracked object: once
    torch, scikit-learn, DCP and dynamo are loaded that costs a trainer rank ~1.7 s of CPU and wall time
    (BENCHMARKS.md), paid by every rank of every job segment, a preempted one's inside its grace period. Frozen objects
    are still destroyed by reference counting and atexit handlers still run (W&B, logging, TensorBoard); what is
    skipped is the search for cycles among objects that die with the process anyway.
    """
    gc.freeze()


def run_command(main: Callable[[], int | None]) -> NoReturn:
    """`sys.exit(main())` for a `python -m csi_dist.<command>` entry point, ending as skip_final_collections says."""
    try:
        status = main()
    finally:
        skip_final_collections()
    sys.exit(status)
