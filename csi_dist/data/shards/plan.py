"""Epoch planning over uneven shards: world-size-independent global batches, exactly-once samples, masked padding.

An epoch is one order of all N samples: shards in a (seed, epoch)-shuffled order, then samples shuffled inside
windows of `shuffle_window` consecutive positions (windows span shard boundaries). Global step t takes positions
[t * G, (t + 1) * G) with G = world_size * batch_size, and rank r takes its batch_size slice of that range. So:

- a global batch holds the same samples on 1, 2 or 64 ranks (the same global batch gives the same step);
- every rank runs exactly `steps = ceil(N / G)` steps whatever the shard sizes: positions past N wrap to the
  start and are flagged as padding, which the loss and the metrics ignore; no rank waits in a collective for
  an exhausted peer;
- the state of an epoch is one number, the count of positions consumed, so a run resumes at the exact sample,
  even on another world size, as long as the global batch is unchanged (else from the same sample on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochPlan:
    shard_of_position: np.ndarray  # (N,) shard index of each position in epoch order
    index_in_shard: np.ndarray  # (N,) sample index inside that shard
    start_position: int  # positions consumed before this loader starts (mid-epoch resume)
    batch_size: int
    world_size: int
    num_workers: int

    @property
    def num_samples(self) -> int:
        return int(self.shard_of_position.shape[0])

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps(self) -> int:
        """Batches every rank yields from start_position to the end of the epoch."""
        remaining = self.num_samples - self.start_position
        return math.ceil(remaining / self.global_batch) if remaining > 0 else 0

    def batch_positions(self, step: int, rank: int) -> range:
        first = self.start_position + step * self.global_batch + rank * self.batch_size
        return range(first, first + self.batch_size)

    def worker_steps(self, worker: int) -> range:
        """The steps one DataLoader worker produces: torch's DataLoader takes them round-robin from worker 0."""
        return range(worker, self.steps, self.num_workers)

    def sample_at(self, position: int) -> tuple[int, int, bool]:
        """(shard, index in shard, is padding) of a position; padding positions repeat the epoch's start."""
        sequence_index = position % self.num_samples
        return (int(self.shard_of_position[sequence_index]), int(self.index_in_shard[sequence_index]),
                position >= self.num_samples)


def epoch_order(shard_counts: list[int] | tuple[int, ...], *, epoch: int, seed: int, shuffle: bool,
                shuffle_window: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard, index in shard) for every position of the epoch, the same on every rank and world size."""
    counts = np.asarray(shard_counts, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    shard_order = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
    shards = np.repeat(shard_order, counts[shard_order])
    indices = np.concatenate([np.arange(counts[s]) for s in shard_order]) if len(counts) else np.zeros(0, np.int64)
    if shuffle and shuffle_window > 1:
        for start in range(0, len(shards), shuffle_window):
            window = slice(start, start + shuffle_window)
            permutation = rng.permutation(len(shards[window]))
            shards[window], indices[window] = shards[window][permutation], indices[window][permutation]
    return shards.astype(np.int64), indices.astype(np.int64)


def plan_epoch(shard_counts: list[int] | tuple[int, ...], *, epoch: int, seed: int, shuffle: bool,
               shuffle_window: int, world_size: int, batch_size: int, num_workers: int,
               start_position: int = 0) -> EpochPlan:
    shards, indices = epoch_order(shard_counts, epoch=epoch, seed=seed, shuffle=shuffle,
                                  shuffle_window=shuffle_window)
    if start_position < 0:
        raise ValueError(f"start_position must be >= 0, got {start_position}")
    return EpochPlan(shards, indices, start_position, batch_size, world_size, max(1, num_workers))
