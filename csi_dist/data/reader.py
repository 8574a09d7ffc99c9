"""Distributed shard reader: manifest checks, per-rank/per-worker streams over tar shards, batches on the host.

Never pass these loaders through `accelerator.prepare()`: they already split by rank and worker (accelerate would
split them again and silently drop data). The trainer moves batches to the device itself.
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from csi_dist.data.shard_format import FORMAT_VERSION, IMAGE_EXTENSIONS, LABEL_EXTENSION, MANIFEST_NAME
from csi_dist.data.shard_plan import EpochPlan, plan_epoch
from csi_dist.data.transforms import DecodeError, decode_grayscale, sample_generator, to_model_input
from csi_dist.domain import NUM_ZONES, UNKNOWN_CLASS

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard directory that cannot be read as planned: missing manifest or shard, size mismatch."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    count: int
    size_bytes: int


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, as listed (and checked) against the manifest."""

    split: str
    shards: tuple[ShardInfo, ...]
    stored_image_size: int
    has_ahf_labels: bool

    @property
    def num_samples(self) -> int:
        return sum(shard.count for shard in self.shards)


def read_manifest(shard_dir: str | Path) -> dict:
    manifest_path = Path(shard_dir) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ShardError(f"no {MANIFEST_NAME} in {shard_dir}: write shards with `csi-shards` "
                         f"(or `csi-shards --demo 600` for the phantom data)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ShardError(f"{manifest_path}: not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ShardError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION!r}")
    return manifest


def open_split(shard_dir: str | Path, split: str) -> ShardSet:
    """The split's shards; a missing or truncated shard file is an error naming the file, before any step runs."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    if split not in manifest.get("splits", {}):
        raise ShardError(f"{shard_dir / MANIFEST_NAME}: no split {split!r} (has {sorted(manifest['splits'])})")
    shards = []
    for entry in manifest["splits"][split]["shards"]:
        path = shard_dir / entry["path"]
        if not path.is_file():
            raise ShardError(f"shard listed in the manifest is missing: {path}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ShardError(f"shard {path} has {size} bytes, the manifest says {entry['bytes']}: truncated or "
                             f"modified (run `csi-shards verify {shard_dir}`)")
        shards.append(ShardInfo(path, int(entry["count"]), size))
    return ShardSet(split, tuple(shards), int(manifest["image_size"]), bool(manifest.get("has_ahf_labels", False)))


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    image_size: int
    normalization: str = "medical"
    augment: bool = False
    shuffle: bool = False
    shuffle_buffer: int = 0
    seed: int = 42
    num_workers: int = 0


@dataclass
class RawSample:
    position: int  # in the padded epoch sequence
    sequence_index: int  # in [0, N): which real sample this is
    is_padding: bool
    members: dict | None  # tar members by extension; None when the shard could not be read
    failure: str = ""


def _read_segment(shard: ShardInfo, first: int, count: int) -> Iterator[dict | str]:
    """Samples [first, first + count) of one shard; a read failure yields its message for each missing sample."""
    delivered = 0
    try:
        with open(shard.path, "rb") as stream:
            files = ({**member, "__url__": str(shard.path)} for member in tar_file_iterator(stream))
            for index, members in enumerate(group_by_keys(files)):
                if index < first:
                    continue
                if delivered == count:
                    break
                delivered += 1
                yield members
    except Exception as error:  # noqa: BLE001 - tarfile raises several types for damaged archives
        message = f"shard {shard.path} unreadable after sample {first + delivered}: {error}"
        log.error(message)
        while delivered < count:
            delivered += 1
            yield message
        return
    if delivered < count:
        message = f"shard {shard.path} ended after {first + delivered} samples, the manifest says {shard.count}"
        log.error(message)
        for _ in range(count - delivered):
            yield message


class ShardStream(IterableDataset):
    """One rank's share of one epoch; inside DataLoader workers each worker reads its own slice of it."""

    def __init__(self, shard_set: ShardSet, plan: EpochPlan, settings: LoaderSettings, *, epoch: int, rank: int,
                 steps_done: int = 0):
        self.shard_set = shard_set
        self.plan = plan
        self.settings = settings
        self.epoch = epoch
        self.rank = rank
        self.steps_done = steps_done
        self.consumed_batches = plan.batches_consumed_per_worker(steps_done)

    def _raw_samples(self, worker: int) -> Iterator[RawSample]:
        worker_slice = self.plan.worker_slice(self.rank, worker)
        position = worker_slice.start
        for shard_index, first, count in self.plan.segments(worker_slice.start,
                                                            worker_slice.num_batches * self.settings.batch_size):
            offset_in_sequence = position % self.plan.num_samples
            for item in _read_segment(self.shard_set.shards[shard_index], first, count):
                members, failure = (None, item) if isinstance(item, str) else (item, "")
                yield RawSample(position, offset_in_sequence, position >= self.plan.num_samples, members, failure)
                position += 1
                offset_in_sequence += 1

    def _shuffled(self, samples: Iterator[RawSample], worker: int) -> Iterator[RawSample]:
        if not (self.settings.shuffle and self.settings.shuffle_buffer > 1):
            yield from samples
            return
        rng = random.Random(f"{self.settings.seed}/{self.epoch}/{self.rank}/{worker}")
        buffer: list[RawSample] = []
        for sample in samples:
            if len(buffer) < self.settings.shuffle_buffer:
                buffer.append(sample)
                continue
            pick = rng.randrange(len(buffer))
            buffer[pick], sample = sample, buffer[pick]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, raw: RawSample) -> dict:
        settings = self.settings
        sample = {"position": raw.position, "sequence_index": raw.sequence_index, "is_padding": raw.is_padding,
                  "file_id": "", "zones": [UNKNOWN_CLASS] * NUM_ZONES, "csi": float("nan"), "ahf": float("nan"),
                  "decode_failed": False}
        failure = raw.failure
        if raw.members is not None:
            key = raw.members.get("__key__", "?")
            try:
                labels = json.loads(raw.members[LABEL_EXTENSION])
                image_bytes = next(raw.members[ext] for ext in IMAGE_EXTENSIONS if ext in raw.members)
                zones = [int(zone) for zone in labels["zones"]]
                if len(zones) != NUM_ZONES or not all(0 <= zone <= UNKNOWN_CLASS for zone in zones):
                    raise ValueError(f"zones {labels['zones']} are not {NUM_ZONES} values in 0..{UNKNOWN_CLASS}")
                pixels = decode_grayscale(image_bytes, settings.image_size)
                generator = sample_generator(settings.seed, self.epoch, raw.position) if settings.augment else None
                sample.update(file_id=str(labels["file_id"]), zones=zones,
                              csi=float("nan") if labels.get("csi") is None else float(labels["csi"]),
                              ahf=float("nan") if labels.get("ahf") is None else float(labels["ahf"]),
                              image=to_model_input(pixels, settings.normalization, generator))
            except (DecodeError, KeyError, ValueError, TypeError, StopIteration) as error:
                failure = f"sample {key!r} in {raw.members.get('__url__', 'a shard')}: {type(error).__name__}: {error}"
                log.warning("skipping undecodable %s", failure)
        if "image" not in sample:
            sample["decode_failed"] = True
            sample["failure"] = failure
            sample["image"] = torch.zeros(1, settings.image_size, settings.image_size)
        return sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.plan.num_workers:
            raise RuntimeError(f"planned {self.plan.num_workers} workers, DataLoader has {info.num_workers}")
        worker = self.plan.logical_worker(0 if info is None else info.id, self.steps_done)
        skip = self.consumed_batches[worker] * self.settings.batch_size
        batch: list[dict] = []
        for index, raw in enumerate(self._shuffled(self._raw_samples(worker), worker)):
            if index < skip:
                continue  # resuming mid-epoch: replay the stream without decoding what was already trained on
            batch.append(self._decode(raw))
            if len(batch) == self.settings.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            raise RuntimeError(f"worker {worker} of rank {self.rank} ended with a partial batch ({len(batch)})")


def collate(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([sample["image"] for sample in samples]),
        "zones": torch.tensor([sample["zones"] for sample in samples], dtype=torch.long),
        "csi": torch.tensor([sample["csi"] for sample in samples], dtype=torch.float32),
        "ahf": torch.tensor([sample["ahf"] for sample in samples], dtype=torch.float32),
        "sequence_index": torch.tensor([sample["sequence_index"] for sample in samples], dtype=torch.long),
        "is_padding": torch.tensor([sample["is_padding"] for sample in samples], dtype=torch.bool),
        "decode_failed": torch.tensor([sample["decode_failed"] for sample in samples], dtype=torch.bool),
        "file_id": [sample["file_id"] for sample in samples],
    }


class EpochLoader:
    """The batches of one rank for one epoch; `len()` is the same on every rank."""

    def __init__(self, stream: ShardStream, pin_memory: bool):
        self.stream = stream
        self.steps = stream.plan.steps
        self.start_step = stream.steps_done
        workers = stream.settings.num_workers
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                 prefetch_factor=4 if workers > 0 else None, persistent_workers=False)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)


def build_loader(shard_set: ShardSet, settings: LoaderSettings, *, epoch: int, rank: int, world_size: int,
                 steps_done: int = 0, pin_memory: bool = False) -> EpochLoader:
    """The loader of one rank for one epoch, starting after `steps_done` batches (mid-epoch resume)."""
    plan = plan_epoch([shard.count for shard in shard_set.shards], epoch=epoch, seed=settings.seed,
                      shuffle=settings.shuffle, world_size=world_size, batch_size=settings.batch_size,
                      num_workers=settings.num_workers)
    return EpochLoader(ShardStream(shard_set, plan, settings, epoch=epoch, rank=rank, steps_done=steps_done),
                       pin_memory)
