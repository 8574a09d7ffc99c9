"""Fault injection for the reliability tests (tests/test_faults.py): off unless a CSI_FAULT_* variable is set.

CSI_FAULT_NONFINITE_LOSS="STEP:KIND[:RANK],..." multiplies the loss of optimizer step STEP (0-based, counted like
`global_step` before the step) by KIND (nan or inf) on rank RANK, or on every rank when RANK is left out. The
gradients become non-finite as they would after a real overflow, so the trainer's skip-and-count path runs for real.
"""
from __future__ import annotations

import os

NONFINITE_LOSS_VARIABLE = "CSI_FAULT_NONFINITE_LOSS"


def nonfinite_loss_factors(rank: int) -> dict[int, float]:
    """{global step: nan or inf} for this rank, from the environment ({} when no fault is asked for)."""
    spec = os.environ.get(NONFINITE_LOSS_VARIABLE, "").strip()
    factors = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        fields = item.split(":")
        if len(fields) not in (2, 3) or fields[1].lower() not in ("nan", "inf"):
            raise ValueError(f"{NONFINITE_LOSS_VARIABLE}={spec!r}: expected STEP:nan|inf[:RANK], got {item!r}")
        if len(fields) == 2 or int(fields[2]) == rank:
            factors[int(fields[0])] = float(fields[1])
    return factors
