"""Distributed shard reader: manifest checks, indexed reads from WebDataset tar shards, batches on the host.

Each worker reads the samples its plan asks for with a seek and a read, at the offsets of the manifest's per-sample
index (see index.py), so any rank can start at any position of the epoch (see plan.py) and a damaged sample
costs only itself.

Never pass these loaders through `accelerator.prepare()`: they already split by rank and worker (accelerate would
split them again and silently drop data). The trainer moves batches to the device itself.
"""
from __future__ import annotations

import json
import logging
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from csi_dist.data.metadata import record_metadata
from csi_dist.data.shards.format import FORMAT_VERSION, IMAGE_EXTENSIONS, LABEL_EXTENSION, MANIFEST_NAME
from csi_dist.data.shards.index import IndexedSample, index_from_json, index_tar, read_members
from csi_dist.data.shards.plan import EpochPlan, plan_epoch
from csi_dist.data.transforms import AUGMENT_DRAWS, DecodeError, augment_draws, decode_image, model_input
from csi_dist.data.workers import worker_options
from csi_dist.core.domain import NUM_ZONES, UNKNOWN_CLASS
from csi_dist.core.faults import slow_batch_seconds

if TYPE_CHECKING:
    from csi_dist.core.config import Config

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard directory that cannot be read as planned: missing manifest or shard, size mismatch."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    count: int
    size_bytes: int
    index: tuple[IndexedSample, ...] | None = None  # from the manifest; None: index the tar headers when read


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, as listed (and checked) against the manifest."""

    split: str
    shards: tuple[ShardInfo, ...]
    stored_image_size: int
    has_ahf_labels: bool
    image_format: str = "png"

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
        try:
            index = None if entry.get("samples") is None else tuple(index_from_json(entry["samples"], str(path)))
        except ValueError as error:
            raise ShardError(str(error)) from None
        shards.append(ShardInfo(path, int(entry["count"]), size, index))
    return ShardSet(split, tuple(shards), int(manifest["image_size"]), bool(manifest.get("has_ahf_labels", False)),
                    str(manifest.get("image_format", "png")))


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    image_size: int
    normalization: str = "medical"
    augment: bool = False
    shuffle: bool = False
    shuffle_window: int = 0  # samples shuffled together (windows span shards); 0 = shard order only
    seed: int = 42
    num_workers: int = 0
    # False: workers hand over finished float images ("image"). True: uint8 "pixels" and the augmentation draws,
    # finished by `finish_on_device` where the batch is moved (the GPU: a quarter of the bytes, no CPU affine)
    finish_on_device: bool = False

    @classmethod
    def from_config(cls, config: Config, image_size: int, *, train: bool, device: torch.device | None = None,
                    batch_size: int | None = None) -> LoaderSettings:
        """Training batches are shuffled and augmented; validation, evaluation and test ones are not. With the
        device the batches go to, images are finished there as data.gpu_augment says; without, in the workers.
        `batch_size`: the trainer's micro-batch (its BatchPlan), else training.batch_size."""
        choice = config.data.gpu_augment.lower()
        finish_on_device = device is not None and (choice == "true" or (choice == "auto" and device.type == "cuda"))
        return cls(batch_size=batch_size or config.training.batch_size, image_size=image_size,
                   normalization=config.data.normalization, augment=train and config.data.augment,
                   shuffle=train, shuffle_window=config.data.shuffle_window if train else 0,
                   seed=config.training.seed, num_workers=config.data.num_workers,
                   finish_on_device=finish_on_device)


class ShardReader:
    """Random access to samples of a shard set, with indexes and open files kept per worker."""

    def __init__(self, shard_set: ShardSet):
        self.shard_set = shard_set
        self.indexes: dict[int, list[IndexedSample] | str] = {}
        self.files: dict[int, BinaryIO] = {}

    def _index(self, shard: int) -> list[IndexedSample]:
        """The manifest's index of the shard, or (older manifests) one read from its tar headers, once."""
        if shard not in self.indexes:
            info = self.shard_set.shards[shard]
            try:
                samples = list(info.index) if info.index is not None else index_tar(info.path, checksums=False)
                if len(samples) != info.count:
                    raise ShardError(f"shard {info.path} holds {len(samples)} samples, the manifest says {info.count}")
                self.indexes[shard] = samples
            except (OSError, tarfile.TarError, ShardError) as error:
                self.indexes[shard] = f"shard {info.path} unreadable: {error}"
                log.error("%s", self.indexes[shard])
        index = self.indexes[shard]
        if isinstance(index, str):
            raise ShardError(index)
        return index

    def key(self, shard: int, index: int) -> str:
        return self._index(shard)[index].key

    def read(self, shard: int, index: int) -> dict[str, bytes]:
        """Member bytes by extension; ShardError naming the shard when it cannot be read at all, DamagedSample
        when only this sample is damaged."""
        sample = self._index(shard)[index]
        if shard not in self.files:
            self.files[shard] = open(self.shard_set.shards[shard].path, "rb")
        return read_members(self.files[shard], sample)

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()


class ShardStream(IterableDataset):
    """One rank's batches of one epoch; each DataLoader worker builds the steps the plan assigns to it."""

    def __init__(self, shard_set: ShardSet, plan: EpochPlan, settings: LoaderSettings, *, epoch: int, rank: int):
        self.shard_set = shard_set
        self.plan = plan
        self.settings = settings
        self.epoch = epoch
        self.rank = rank
        counts = [shard.count for shard in shard_set.shards]
        self.shard_starts = [sum(counts[:i]) for i in range(len(counts))]  # sample_index = manifest order

    def _sample(self, reader: ShardReader, position: int) -> dict:
        settings = self.settings
        shard, index, is_padding = self.plan.sample_at(position)
        sample = {"sample_index": self.shard_starts[shard] + index, "is_padding": is_padding, "file_id": "",
                  "zones": [UNKNOWN_CLASS] * NUM_ZONES, "csi": float("nan"), "ahf": float("nan"),
                  "decode_failed": False, "draws": None, "metadata": {}, "patient_id": None}
        where = f"sample {index} of {self.shard_set.shards[shard].path}"
        try:
            where = f"sample {reader.key(shard, index)!r} of {self.shard_set.shards[shard].path}"
            members = reader.read(shard, index)
            labels = json.loads(members[LABEL_EXTENSION])
            extension = next(ext for ext in IMAGE_EXTENSIONS if ext in members)
            zones = [int(zone) for zone in labels["zones"]]
            if len(zones) != NUM_ZONES or not all(0 <= zone <= UNKNOWN_CLASS for zone in zones):
                raise ValueError(f"zones {labels['zones']} are not {NUM_ZONES} values in 0..{UNKNOWN_CLASS}")
            pixels = decode_image(members[extension], extension, settings.image_size)
            sample.update(file_id=str(labels["file_id"]), zones=zones,
                          csi=float("nan") if labels.get("csi") is None else float(labels["csi"]),
                          ahf=float("nan") if labels.get("ahf") is None else float(labels["ahf"]), pixels=pixels,
                          metadata=record_metadata(labels),
                          patient_id=None if labels.get("patient_id") is None else str(labels["patient_id"]),
                          draws=augment_draws(settings.seed, self.epoch, position) if settings.augment else None)
        except (ShardError, DecodeError, KeyError, ValueError, TypeError, StopIteration) as error:
            if not isinstance(error, ShardError):  # an unreadable shard was logged once already
                log.warning("skipping undecodable %s: %s: %s", where, type(error).__name__, error)
            sample["decode_failed"] = True
            sample["pixels"] = torch.zeros(1, settings.image_size, settings.image_size, dtype=torch.uint8)
        return sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.plan.num_workers:
            raise RuntimeError(f"planned {self.plan.num_workers} workers, DataLoader has {info.num_workers}")
        reader = ShardReader(self.shard_set)
        held_back = slow_batch_seconds()  # 0.0 unless a test asks for a slow loader (csi_dist/core/faults.py)
        try:
            for step in self.plan.worker_steps(0 if info is None else info.id):
                time.sleep(held_back)
                samples = [self._sample(reader, position) for position in self.plan.batch_positions(step, self.rank)]
                yield collate(samples, self.settings)
        finally:
            reader.close()


def collate(samples: list[dict], settings: LoaderSettings) -> dict:
    """One batch; its images finished here (float "image") or left for the device (see finish_on_device)."""
    pixels = torch.stack([sample["pixels"] for sample in samples])
    draws = None
    if settings.augment:  # a failed sample has no draws: zeros, its image is masked out anyway
        draws = torch.stack([torch.zeros(AUGMENT_DRAWS) if sample["draws"] is None else sample["draws"]
                             for sample in samples])
    if settings.finish_on_device:
        images = {"pixels": pixels, "augment_draws": draws, "normalization": settings.normalization}
    else:
        images = {"image": model_input(pixels, settings.normalization, draws)}
    return {
        **images,
        "zones": torch.tensor([sample["zones"] for sample in samples], dtype=torch.long),
        "csi": torch.tensor([sample["csi"] for sample in samples], dtype=torch.float32),
        "ahf": torch.tensor([sample["ahf"] for sample in samples], dtype=torch.float32),
        "sample_index": torch.tensor([sample["sample_index"] for sample in samples], dtype=torch.long),
        "is_padding": torch.tensor([sample["is_padding"] for sample in samples], dtype=torch.bool),
        "decode_failed": torch.tensor([sample["decode_failed"] for sample in samples], dtype=torch.bool),
        "file_id": [sample["file_id"] for sample in samples],
        "metadata": [sample["metadata"] for sample in samples],
        "patient_id": [sample["patient_id"] for sample in samples],  # None where the label CSV had no patient  # {column: text or None} of the label CSV's extras
    }


def finish_on_device(batch: dict, device: torch.device) -> torch.Tensor:
    """The batch's model input on `device`: a finished "image" is copied; uint8 "pixels" are copied, then
    normalised and augmented there (the same `model_input` the workers run otherwise)."""
    if "image" in batch:
        return batch["image"].to(device, non_blocking=True)
    draws = batch["augment_draws"]
    return model_input(batch["pixels"].to(device, non_blocking=True), batch["normalization"],
                       None if draws is None else draws.to(device, non_blocking=True))


class EpochLoader:
    """The batches of one rank for one epoch; `len()` is the same on every rank."""

    def __init__(self, stream: ShardStream, pin_memory: bool):
        self.stream = stream
        self.steps = stream.plan.steps
        workers = stream.settings.num_workers
        # a private generator: creating the iterator must not draw from the global RNG (exact resume)
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                 prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
                                 generator=torch.Generator().manual_seed(0), **worker_options(workers))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)


def build_loader(shard_set: ShardSet, settings: LoaderSettings, *, epoch: int, rank: int, world_size: int,
                 start_position: int = 0, pin_memory: bool = False) -> EpochLoader:
    """The loader of one rank for one epoch, starting after `start_position` samples (mid-epoch resume)."""
    plan = plan_epoch([shard.count for shard in shard_set.shards], epoch=epoch, seed=settings.seed,
                      shuffle=settings.shuffle, shuffle_window=settings.shuffle_window, world_size=world_size,
                      batch_size=settings.batch_size, num_workers=settings.num_workers, start_position=start_position)
    return EpochLoader(ShardStream(shard_set, plan, settings, epoch=epoch, rank=rank), pin_memory)
