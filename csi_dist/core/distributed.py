"""The Accelerator for this launch, with loud failures for the launcher mistakes that silently train alone."""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from csi_dist.core.config import TrainingConfig
from csi_dist.core.redaction import install_secret_filter

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The processes that started do not form the job the launcher asked for."""


def resolve_mixed_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def build_accelerator(training: TrainingConfig) -> Accelerator:
    """Accelerate's autocast is the compute precision of every strategy (fp32 weights; see strategies.py)."""
    on_cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(training.mixed_precision),
        cpu=on_cpu,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=training.collective_timeout_s))],
    )
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise LaunchError(
            f"WORLD_SIZE={expected} but accelerate formed a group of {accelerator.num_processes}: on CPU launch with "
            f"`python -m csi_dist.launcher --cpu --num_processes N -m csi_dist.train ...`")
    threads = cpu_threads_per_process(accelerator.num_processes)
    torch.set_num_threads(threads)
    log.info("%d intra-op CPU thread(s) per process (OMP_NUM_THREADS=%s)", threads,
             os.environ.get("OMP_NUM_THREADS", "unset"))
    if not on_cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = training.cudnn_benchmark and not training.deterministic
    if training.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return accelerator


def cpu_threads_per_process(world_size: int) -> int:
    """OMP_NUM_THREADS when set, else 1 for a multi-process run (what `accelerate launch` and torchrun export) and
    torch's default for one process. Set by the trainer itself, so that ranks started by submitit or srun directly
    compute exactly what ranks started by accelerate compute (CPU reductions depend on the thread count)."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return 1 if world_size > 1 else torch.get_num_threads()


def leave_process_group() -> None:
    """Destroy the default process group, if there is one, before this rank exits on a decision every rank made.

    A group left alive for the interpreter's exit can abort the process ("terminate called without an active
    exception", SIGABRT) and replace the exit status the user reads with -6.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def configure_logging(accelerator: Accelerator) -> None:
    """INFO on the main process, warnings only elsewhere, each line tagged with its rank."""
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{accelerator.process_index}] %(name)s: %(message)s",
                        force=True)
    install_secret_filter()


# Torch types the failures of NCCL, the TCP store and rendezvous (DistBackendError, DistStoreError,
# DistNetworkError: all DistError, in every torch of our range). Gloo's transport gives no type: a dead or frozen peer
# is a plain RuntimeError (checked on torch 2.14: a killed peer gives "[.../third_party/gloo/gloo/transport/tcp/
# pair.cc:...] Connection closed by peer", a frozen one "[.../unbound_buffer.cc:...] Timed out waiting <N>ms for recv
# operation", a frozen peer during DDP's buffer broadcast the bare "Application timeout caused pair closure"), so for
# gloo alone the message text is all there is to go by.
GLOO_PEER_LOST_MARKERS = ("/gloo/", "pair closure", "Connection reset by peer", "Connection closed by peer",
                          "Timed out waiting")


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed or timed out (training.collective_timeout_s): another rank died, froze or lost
    its network. NCCL and the store raise a DistError; gloo a plain RuntimeError recognised by its wording."""
    if isinstance(error, torch.distributed.DistError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in GLOO_PEER_LOST_MARKERS)
