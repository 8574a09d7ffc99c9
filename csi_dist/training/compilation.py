"""torch.compile with its compiled kernels cached in the run directory: a requeued or resumed run compiles nothing."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from csi_dist import USER_COMPILE_CACHE_DIR
from csi_dist.core.run_dir import RunDir

log = logging.getLogger(__name__)

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"  # inductor's FX graph, autograd and Triton caches all live below it


def compile_with_run_cache(model: torch.nn.Module, run_dir: Path) -> torch.nn.Module:
    """`torch.compile(model)` caching in `<run_dir>/compile_cache` (a TORCHINDUCTOR_CACHE_DIR set by the user wins).

    Inductor's default cache is /tmp on the node, which a job that SLURM requeues onto another node, or a node
    that wiped /tmp, does not have: every restart would compile again (40 s for a ResNet-50 on an H100).
    """
    cache = USER_COMPILE_CACHE_DIR or str(RunDir(run_dir).compile_cache.resolve())
    os.environ[CACHE_VARIABLE] = cache  # set again: importing timm filled in inductor's /tmp default
    log.info("torch.compile cache: %s%s", cache, f" (from {CACHE_VARIABLE})" if USER_COMPILE_CACHE_DIR else "")
    return torch.compile(model)
