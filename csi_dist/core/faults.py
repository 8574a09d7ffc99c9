"""Fault injection for the reliability tests (tests/test_faults.py): off unless a CSI_FAULT_* variable is set.

CSI_FAULT_NONFINITE_LOSS="STEP:KIND[:RANK],..." multiplies the loss of optimizer step STEP (0-based, counted like
`global_step` before the step) by KIND (nan or inf) on rank RANK, or on every rank when RANK is left out. The
gradients become non-finite as they would after a real overflow, so the trainer's skip-and-count path runs for real.

CSI_FAULT_NONFINITE_INPUT="STEP:KIND[:RANK],..." (same form) fills one image of the first micro-batch of optimizer
step STEP with KIND before the forward pass: every activation after the first layer is non-finite, as after a real
overflow inside the network, so BatchNorm folds it into its running statistics before any loss exists (what a fault
on the loss never reaches).

CSI_FAULT_GPU_MEMORY_GIB=G lets this process use only G GiB of its GPU (torch's per-process memory fraction), so a
micro-batch that needs more meets a real CUDA out-of-memory error (tests/gpu: the micro-batch fitting).

CSI_FAULT_SLOW_BATCH_SECONDS=S makes every loader worker take S seconds more for each batch it builds, so the
trainer really waits on its data (tests: the data-bound message).
"""
from __future__ import annotations

import os

NONFINITE_LOSS_VARIABLE = "CSI_FAULT_NONFINITE_LOSS"
NONFINITE_INPUT_VARIABLE = "CSI_FAULT_NONFINITE_INPUT"
GPU_MEMORY_VARIABLE = "CSI_FAULT_GPU_MEMORY_GIB"
SLOW_BATCH_VARIABLE = "CSI_FAULT_SLOW_BATCH_SECONDS"


def nonfinite_loss_factors(rank: int) -> dict[int, float]:
    """{global step: nan or inf} for this rank, from the environment ({} when no fault is asked for)."""
    return _nonfinite_steps(NONFINITE_LOSS_VARIABLE, rank)


def nonfinite_input_values(rank: int) -> dict[int, float]:
    """{global step: nan or inf} for this rank: the steps whose first micro-batch gets a non-finite image."""
    return _nonfinite_steps(NONFINITE_INPUT_VARIABLE, rank)


def with_nonfinite_image(images, value: float):
    """A copy of the batch whose first image is `value` (nan or inf) everywhere."""
    images = images.clone()
    images[0] = value
    return images


def _nonfinite_steps(variable: str, rank: int) -> dict[int, float]:
    spec = os.environ.get(variable, "").strip()
    values = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        fields = item.split(":")
        if len(fields) not in (2, 3) or fields[1].lower() not in ("nan", "inf"):
            raise ValueError(f"{variable}={spec!r}: expected STEP:nan|inf[:RANK], got {item!r}")
        if len(fields) == 2 or int(fields[2]) == rank:
            values[int(fields[0])] = float(fields[1])
    return values


def limit_gpu_memory(device) -> None:
    """Cap this process's share of its GPU when CSI_FAULT_GPU_MEMORY_GIB asks for it (nothing otherwise)."""
    gib = os.environ.get(GPU_MEMORY_VARIABLE, "").strip()
    if not gib or device.type != "cuda":
        return
    import torch
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(gib) * 2**30 / total), device)


def slow_batch_seconds() -> float:
    """Seconds each loader batch is held back (0.0 unless CSI_FAULT_SLOW_BATCH_SECONDS asks for it)."""
    return float(os.environ.get(SLOW_BATCH_VARIABLE, "").strip() or 0.0)
