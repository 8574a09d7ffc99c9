"""The shard writer: a label CSV and its images into WebDataset tar shards with a manifest (`csi-shards write` and
`--demo`; the command line is csi_dist/shards.py)."""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from csi_dist.data.radiographs import (DEFAULT_JPEG_QUALITY, ImageError, IMAGE_SUFFIXES, build_image_index,
                                       encode_image_file, image_for)
from csi_dist.data.labels import LINE_COLUMN, METADATA_COLUMN, read_label_csv
from csi_dist.data.metadata import COLUMNS_KEY, METADATA_KEY, metadata_counts
from csi_dist.data.phantom import generate_phantom
from csi_dist.data.shards.format import (
    FORMAT_VERSION,
    IMAGE_EXTENSIONS,
    LABEL_EXTENSION,
    MANIFEST_NAME,
    SHARD_PATTERN,
    SPLIT_FILE_NAME,
    SPLIT_NAMES,
)
from csi_dist.data.shards.index import index_tar, index_to_json
from csi_dist.data.split import (
    DEFAULT_FRACTIONS,
    DEFAULT_SEED,
    SPLIT_COLUMN,
    apply_split_file,
    save_split,
    split_patients,
)
from csi_dist.core.domain import AHF_COLUMN, CSI_COLUMN, FILE_ID_COLUMN, NUM_CLASSES, PATIENT_COLUMN, ZONE_NAMES
from csi_dist.core.files import atomic_write_json, file_sha256

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 512
DEFAULT_SHARD_MAX_MB = 256.0
DEFAULT_DEMO_IMAGES = 200
DEFAULT_DEMO_OUT = Path("data/demo_shards")
DEFAULT_DEMO_SIZE = 128
# A fixed member mtime makes identical inputs give byte-identical shards (and sha256s).
TAR_MTIME = 0
SKIPPED_SHOWN = 10


class ShardWriteError(RuntimeError):
    """The shards cannot be written as asked (existing output, --strict skips, bad options)."""


def available_cores() -> int:
    """CPU cores this process may use (respects SLURM/cgroup CPU binding, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0))


def sample_keys(file_ids: Iterable[str]) -> list[str]:
    """Tar sample key per FileID: characters outside [A-Za-z0-9_-] become "_", collisions get "_1", "_2", ..."""
    safe = ["".join(char if char.isascii() and (char.isalnum() or char in "_-") else "_" for char in str(file_id))
            for file_id in file_ids]
    natural = set(safe)
    used: set[str] = set()
    keys = []
    for key in safe:
        if key in used:
            suffix = 1
            # Never take a suffixed key that another FileID produces naturally.
            while f"{key}_{suffix}" in used or f"{key}_{suffix}" in natural:
                suffix += 1
            key = f"{key}_{suffix}"
        used.add(key)
        keys.append(key)
    return keys


def encode_sample_image(task: tuple) -> tuple[bytes | None, str | None]:
    """Worker: decode, resize and encode one image; returns (bytes, None) or (None, reason it was skipped)."""
    path, image_size, image_format, jpeg_quality = task
    try:
        return encode_image_file(path, image_size, image_format, jpeg_quality), None
    except ImageError as err:
        return None, f"{type(err).__name__}: {err}"


def _map_chunk(function: Callable, chunk: Sequence) -> list:
    return [function(item) for item in chunk]


def ordered_parallel_map(function: Callable, items: Sequence, workers: int, chunk_size: int = 16) -> Iterator:
    """Yield function(item) in input order, computed on `workers` processes with a bounded number of chunks in flight."""
    if workers <= 1 or len(items) <= chunk_size:
        yield from map(function, items)
        return
    chunks = [items[start:start + chunk_size] for start in range(0, len(items), chunk_size)]
    with ProcessPoolExecutor(workers) as pool:
        in_flight: collections.deque = collections.deque()
        next_chunk = 0
        while next_chunk < len(chunks) or in_flight:
            while next_chunk < len(chunks) and len(in_flight) < 4 * workers:
                in_flight.append(pool.submit(_map_chunk, function, chunks[next_chunk]))
                next_chunk += 1
            yield from in_flight.popleft().result()


def label_record(row: pd.Series) -> dict:
    """The "<key>.json" payload of one CSV row (see format.LABEL_KEYS; "metadata" only when the CSV has extra
    columns, so shards of CSVs without stay byte-identical to earlier ones)."""
    csi = float(row[CSI_COLUMN])
    ahf = row.get(AHF_COLUMN, math.nan)
    patient = row.get(PATIENT_COLUMN, None)
    record = {"file_id": str(row[FILE_ID_COLUMN]),
              "zones": [int(row[zone]) for zone in ZONE_NAMES],
              "csi": None if math.isnan(csi) else csi,
              "ahf": None if pd.isna(ahf) else int(ahf),
              "patient_id": None if pd.isna(patient) else str(patient)}
    metadata = row.get(METADATA_COLUMN, None)
    if isinstance(metadata, dict):
        record[METADATA_KEY] = metadata
    return record


def shard_entry(out_dir: Path, shard_path: Path) -> dict:
    """Manifest entry of a closed shard: relative path, sample count, bytes, sha256 and the per-sample index (file
    fsynced first)."""
    descriptor = os.open(shard_path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    samples = index_tar(shard_path)
    return {"path": shard_path.relative_to(out_dir).as_posix(), "count": len(samples),
            "bytes": shard_path.stat().st_size, "sha256": file_sha256(shard_path), "samples": index_to_json(samples)}


def _earlier_shards(out_dir: Path, overwrite: bool) -> list[Path]:
    """The shard files of an earlier write in `out_dir`; ShardWriteError when there is one and not `overwrite`
    (checked before the CSV is read, so a user is not made to fix the CSV first)."""
    manifest = out_dir / MANIFEST_NAME
    old_shards = [path for split in SPLIT_NAMES for path in sorted((out_dir / split).glob("shard-*.tar"))]
    if (manifest.exists() or old_shards) and not overwrite:
        raise ShardWriteError(f"{out_dir}: already holds shards ({MANIFEST_NAME} or */shard-*.tar); "
                              f"choose another --out or pass --overwrite")
    return old_shards


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier write unless `overwrite`; then drop its manifest FIRST, then its shards."""
    manifest = out_dir / MANIFEST_NAME
    old_shards = _earlier_shards(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    for path in old_shards:
        path.unlink()


def _histogram(records: list[dict]) -> dict[str, list[int]]:
    zones = np.array([record["zones"] for record in records], dtype=np.int64).reshape(-1, len(ZONE_NAMES))
    return {zone: np.bincount(zones[:, index], minlength=NUM_CLASSES).tolist() for index, zone in enumerate(ZONE_NAMES)}


def _write_split_shards(split_dir: Path, samples: Iterator[tuple[str, bytes, dict]], image_format: str,
                        max_count: int, max_bytes: float) -> list[Path]:
    """Write (key, image bytes, label) samples with webdataset's ShardWriter; returns the shard paths in order.

    Nothing is created for a split without samples, so an empty split has no shard files.
    """
    import webdataset  # imports torch (seconds); only the writer needs it, not `verify`

    written: list[Path] = []
    writer = None
    try:
        for key, image_bytes, label in samples:
            if writer is None:
                split_dir.mkdir(parents=True, exist_ok=True)
                pattern = str(split_dir).replace("%", "%%") + "/" + SHARD_PATTERN
                writer = webdataset.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0,
                                                post=lambda name: written.append(Path(name)),
                                                encoder=False, mtime=TAR_MTIME)
            writer.write({"__key__": key, image_format: image_bytes,
                          LABEL_EXTENSION: json.dumps(label, separators=(",", ":")).encode("utf-8")})
    finally:
        if writer is not None:
            writer.close()
    return written


def write_shards(csv_path: str | Path, images_dir: str | Path, out_dir: str | Path, *,
                 image_size: int = DEFAULT_IMAGE_SIZE, image_format: str = "png",
                 jpeg_quality: int = DEFAULT_JPEG_QUALITY, shard_max_mb: float = DEFAULT_SHARD_MAX_MB,
                 samples_per_shard: int | None = None, workers: int | None = None, split_seed: int = DEFAULT_SEED,
                 split_fractions: Sequence[float] = DEFAULT_FRACTIONS, split_file: str | Path | None = None,
                 exclude_ids: set[str] | None = None, strict: bool = False, overwrite: bool = False,
                 csv_encoding: str | None = None) -> dict:
    """Write the shards, split.csv and (last, atomically) manifest.json of format.py into `out_dir`.

    Samples whose image is missing or cannot be decoded are skipped and listed in manifest["skipped"]; with
    `strict` any skip raises `ShardWriteError` and no manifest is written. A split that receives no sample
    (tiny datasets) is written as count 0 with no shards. Shards close at `samples_per_shard` samples when given,
    otherwise once they hold `shard_max_mb` MB of payload. `csv_encoding` is passed to `read_label_csv` (None:
    UTF-8, falling back to cp1252 with a warning). Returns the manifest.
    """
    if image_format not in IMAGE_EXTENSIONS:
        raise ShardWriteError(f"image format {image_format!r}; expected one of {IMAGE_EXTENSIONS}")
    if image_size < 1 or not 1 <= jpeg_quality <= 100 or (samples_per_shard is not None and samples_per_shard < 1):
        raise ShardWriteError(f"image_size={image_size}, jpeg_quality={jpeg_quality}, "
                              f"samples_per_shard={samples_per_shard}; expected positive size and count, quality 1-100")
    csv_path, images_dir, out_dir = Path(csv_path), Path(images_dir), Path(out_dir)
    workers = workers or available_cores()
    _earlier_shards(out_dir, overwrite)
    labels = read_label_csv(csv_path, exclude_ids, encoding=csv_encoding)
    split = apply_split_file(labels, split_file) if split_file else split_patients(labels, split_fractions, split_seed)
    labels = labels.assign(**{SPLIT_COLUMN: split[SPLIT_COLUMN].to_numpy(), "key": sample_keys(labels[FILE_ID_COLUMN])})
    image_index = build_image_index(images_dir)
    _prepare_out_dir(out_dir, overwrite)
    save_split(split, out_dir / SPLIT_FILE_NAME)

    skipped: list[dict] = []
    ordered = pd.concat([labels[labels[SPLIT_COLUMN] == name] for name in SPLIT_NAMES])
    found = ordered[FILE_ID_COLUMN].map(lambda file_id: image_for(image_index, file_id))
    for _, row in ordered[found.isna()].iterrows():
        skipped.append({"file_id": row[FILE_ID_COLUMN], "row": int(row[LINE_COLUMN]),
                        "reason": f"MissingImageError: no {row[FILE_ID_COLUMN]}{{{','.join(IMAGE_SUFFIXES)}}} "
                                  f"in {images_dir}"})
    if strict and skipped:
        raise ShardWriteError(_skip_message(skipped, "--strict: missing images"))
    present = ordered[found.notna()]
    tasks = [(path, image_size, image_format, jpeg_quality) for path in found[found.notna()]]
    logger.info("encoding %d images to %d px %s on %d worker process(es)", len(tasks), image_size, image_format,
                min(workers, len(tasks)))

    encoded = ordered_parallel_map(encode_sample_image, tasks, workers)
    progress = tqdm(total=len(tasks), unit="img", desc="csi-shards", disable=not sys.stderr.isatty())
    records_by_split: dict[str, list[dict]] = {name: [] for name in SPLIT_NAMES}
    shards_by_split: dict[str, list[Path]] = {}
    rows = iter(present.iterrows())

    def samples_of(split_name: str, count: int) -> Iterator[tuple[str, bytes, dict]]:
        for _ in range(count):
            _, row = next(rows)
            image_bytes, reason = next(encoded)
            progress.update()
            if image_bytes is None:
                skipped.append({"file_id": row[FILE_ID_COLUMN], "row": int(row[LINE_COLUMN]), "reason": reason})
                continue
            record = label_record(row)
            records_by_split[split_name].append(record)
            yield row["key"], image_bytes, record

    extra_columns = list(labels[METADATA_COLUMN].iloc[0]) if METADATA_COLUMN in labels else []
    max_count = samples_per_shard or sys.maxsize
    max_bytes = float("inf") if samples_per_shard else shard_max_mb * 1e6
    with progress:
        for name in SPLIT_NAMES:
            count = int((present[SPLIT_COLUMN] == name).sum())
            shards_by_split[name] = _write_split_shards(out_dir / name, samples_of(name, count), image_format,
                                                        max_count, max_bytes)
    if strict and skipped:
        raise ShardWriteError(_skip_message(skipped, "--strict: images could not be read"))

    manifest = {
        "format": FORMAT_VERSION, "image_size": image_size, "image_format": image_format,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source_csv": str(csv_path.resolve()), "source_images": str(images_dir.resolve()),
        "split_seed": split_seed, "split_fractions": [float(fraction) for fraction in split_fractions],
        "split_file": str(Path(split_file).resolve()) if split_file else None,
        "has_ahf_labels": bool(AHF_COLUMN in labels and labels[AHF_COLUMN].notna().any()),
        "excluded_file_ids": sorted(exclude_ids or []), COLUMNS_KEY: extra_columns,
        "splits": {name: {"count": len(records_by_split[name]), "label_histogram": _histogram(records_by_split[name]),
                          **({METADATA_KEY: metadata_counts(records_by_split[name], extra_columns)}
                             if extra_columns else {}),
                          "shards": [shard_entry(out_dir, path) for path in shards_by_split[name]]}
                   for name in SPLIT_NAMES},
        "skipped": {"count": len(skipped), "samples": sorted(skipped, key=lambda sample: sample["row"])},
    }
    atomic_write_json(out_dir / MANIFEST_NAME, manifest, indent=1)
    _log_summary(manifest, out_dir)
    return manifest


def _skip_message(skipped: list[dict], title: str) -> str:
    shown = "; ".join(f"line {sample['row']} FileID {sample['file_id']}: {sample['reason']}"
                      for sample in sorted(skipped, key=lambda sample: sample["row"])[:SKIPPED_SHOWN])
    more = f" (and {len(skipped) - SKIPPED_SHOWN} more)" if len(skipped) > SKIPPED_SHOWN else ""
    return f"{title}: {len(skipped)} sample(s): {shown}{more}"


def _log_summary(manifest: dict, out_dir: Path) -> None:
    splits = manifest["splits"]
    logger.info("wrote %d samples in %d shard(s) to %s: %s", sum(split["count"] for split in splits.values()),
                sum(len(split["shards"]) for split in splits.values()), out_dir,
                ", ".join(f"{name} {split['count']}" for name, split in splits.items()))
    skipped = manifest["skipped"]["samples"]
    if skipped:
        reasons = collections.Counter(sample["reason"].split(":", 1)[0] for sample in skipped)
        logger.warning("skipped %d sample(s) (%s); listed in %s under 'skipped'. %s", len(skipped),
                       ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items())),
                       out_dir / MANIFEST_NAME, _skip_message(skipped, "first"))


def write_demo(out_dir: str | Path = DEFAULT_DEMO_OUT, n_images: int = DEFAULT_DEMO_IMAGES,
               image_size: int = DEFAULT_DEMO_SIZE, seed: int = 0, workers: int | None = None,
               image_format: str = "png") -> dict:
    """Generate the phantom under out_dir/raw (at max(256, image_size) px) and write its shards into out_dir.

    Re-running over an earlier demo replaces it; an `out_dir` holding other shards is refused.
    """
    out_dir = Path(out_dir)
    raw_csv = out_dir / "raw" / "labels.csv"
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.exists():
        source = json.loads(manifest_path.read_text(encoding="utf-8")).get("source_csv")
        if source != str(raw_csv.resolve()):
            raise ShardWriteError(f"{out_dir}: holds shards of {source}, not a demo; choose another --out")
    csv_path = generate_phantom(out_dir / "raw", n_images, image_size=max(256, image_size), seed=seed,
                                workers=workers)
    return write_shards(csv_path, csv_path.parent / "images", out_dir, image_size=image_size, workers=workers,
                        image_format=image_format, overwrite=True)
