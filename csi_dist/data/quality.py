"""The bound on undecodable samples: a run stops with a clear error rather than train or validate on too little."""
from __future__ import annotations

import math


class TooManyBadSamples(RuntimeError):
    """More undecodable samples in a split than `data.max_bad_fraction` allows."""


def check_bad_samples(split: str, failures: int, split_size: int, max_fraction: float, where: str) -> None:
    """Raise once `failures` real samples of an epoch's `split` (padding copies not counted) could not be decoded and
    that is more than `max_fraction` of the split allows: a count that only grows, so it can be checked mid-epoch."""
    allowed = math.floor(max_fraction * split_size)
    if failures > allowed:
        raise TooManyBadSamples(
            f"{failures} of the {split_size} {split} samples in {where} could not be read or decoded this epoch, more "
            f"than data.max_bad_fraction = {max_fraction:g} allows ({allowed}); the log names them. Check the shards "
            f"with `csi-shards verify {where}` and rewrite the damaged ones, or raise data.max_bad_fraction")
