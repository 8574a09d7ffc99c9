"""Epoch planning over uneven shards: equal batches per rank, exactly-once samples, masked padding, resumable.

The epoch is one sequence of sample positions over the concatenated shards (shard order shuffled by seed and
epoch). It is padded to `world_size * steps * batch_size` positions, where `steps = ceil(N / (world_size *
batch_size))`; padding positions wrap to the start and are flagged so the loss and the metrics ignore them.
Each rank reads one contiguous block of that sequence; inside a rank, each DataLoader worker reads a contiguous
sub-block holding a whole number of batches, so every rank yields exactly `steps` batches whatever the shard
sizes and no DDP collective can wait on an exhausted rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WorkerSlice:
    """The positions one worker of one rank reads: [start, start + num_batches * batch_size) of the padded epoch."""

    start: int
    num_batches: int


@dataclass(frozen=True)
class EpochPlan:
    shard_order: tuple[int, ...]  # shard indices in reading order
    shard_counts: tuple[int, ...]  # samples per shard, in manifest order
    num_samples: int  # real samples in the epoch (N)
    steps: int  # batches per rank
    batch_size: int
    world_size: int
    num_workers: int

    def rank_start(self, rank: int) -> int:
        return rank * self.steps * self.batch_size

    def worker_batches(self, worker: int) -> int:
        """Batches of one worker: steps split as evenly as possible, earlier workers take the remainder."""
        return self.steps // self.num_workers + (1 if worker < self.steps % self.num_workers else 0)

    def worker_slice(self, rank: int, worker: int) -> WorkerSlice:
        earlier = sum(self.worker_batches(w) for w in range(worker))
        return WorkerSlice(self.rank_start(rank) + earlier * self.batch_size, self.worker_batches(worker))

    def batches_consumed_per_worker(self, steps_done: int) -> list[int]:
        """How many batches each worker had delivered after `steps_done` batches of its rank.

        torch's DataLoader takes batches from an iterable dataset's workers round-robin, so batch t of a rank
        comes from worker t % num_workers (earlier workers hold the remainder, so none runs dry early).
        """
        if not 0 <= steps_done <= self.steps:
            raise ValueError(f"steps_done={steps_done} is outside the {self.steps} steps of this epoch")
        return [max(0, -(-(steps_done - worker) // self.num_workers)) for worker in range(self.num_workers)]

    def logical_worker(self, physical_worker: int, steps_done: int) -> int:
        """The worker slice a DataLoader worker serves when the loader starts after `steps_done` batches.

        A new DataLoader always starts its round-robin at worker 0, while the uninterrupted epoch would continue
        with worker steps_done % num_workers: rotating the roles keeps the batch order identical.
        """
        return (physical_worker + steps_done) % self.num_workers

    def segments(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """(shard index, first sample in shard, count) runs covering padded positions [start, start + length)."""
        runs: list[tuple[int, int, int]] = []
        if self.num_samples == 0:
            return runs
        position = start
        end = start + length
        offsets = np.cumsum([0] + [self.shard_counts[i] for i in self.shard_order])
        while position < end:
            sequence_index = position % self.num_samples
            slot = int(np.searchsorted(offsets, sequence_index, side="right")) - 1
            shard = self.shard_order[slot]
            first = sequence_index - int(offsets[slot])
            take = min(self.shard_counts[shard] - first, end - position, self.num_samples - sequence_index)
            runs.append((shard, first, take))
            position += take
        return runs


def plan_epoch(shard_counts: list[int] | tuple[int, ...], *, epoch: int, seed: int, shuffle: bool, world_size: int,
               batch_size: int, num_workers: int) -> EpochPlan:
    num_samples = int(sum(shard_counts))
    order = list(range(len(shard_counts)))
    if shuffle:
        order = [int(i) for i in np.random.default_rng([seed, epoch]).permutation(len(shard_counts))]
    steps = math.ceil(num_samples / (world_size * batch_size)) if num_samples else 0
    return EpochPlan(tuple(order), tuple(int(c) for c in shard_counts), num_samples, steps, batch_size, world_size,
                     max(1, num_workers))
