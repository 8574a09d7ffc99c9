"""Builders of small real label CSVs and image files for the data writer tests; what a run's record says ran."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from csi_dist.core.domain import CSI_COLUMN, CSV_SEPARATOR, FILE_ID_COLUMN, ZONE_NAMES

HEADER = [FILE_ID_COLUMN, *ZONE_NAMES, CSI_COLUMN]


def write_csv(path: Path, rows: list[list], header: list[str] = HEADER, separator: str = CSV_SEPARATOR) -> Path:
    """Write `rows` under `header` as text, cells converted with str() (None -> empty cell)."""
    lines = [separator.join(header)]
    lines += [separator.join("" if cell is None else str(cell) for cell in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def label_row(file_id: str, zones=(0, 1, 2, 3, None, 0), csi="", *extra) -> list:
    """One CSV row: FileID, six zone cells, csi, then any extra cells (patient_id, ahf)."""
    return [file_id, *zones, csi, *extra]


def gradient_image(height: int = 40, width: int = 30) -> np.ndarray:
    """A uint8 image whose every pixel differs from its mirror images, to catch flips and transposes."""
    rows = np.arange(height, dtype=np.int64)[:, None]
    cols = np.arange(width, dtype=np.int64)[None, :]
    return ((rows * 5 + cols * 2) % 256).astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", window: tuple | None = None,
                slope: float | None = None, intercept: float | None = None, bits: int = 16, **elements) -> Path:
    """Write a minimal single-frame uncompressed DICOM (8- or 16-bit unsigned pixels) with pydicom.

    `elements` are further DICOM keywords set as given (a palette's LUT descriptors and data, say).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = bits
    dataset.BitsStored = bits
    dataset.HighBit = bits - 1
    dataset.PixelRepresentation = 0
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    if slope is not None:
        dataset.RescaleSlope = slope
    if intercept is not None:
        dataset.RescaleIntercept = intercept
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def strategies_that_ran(run_dir: Path) -> list[dict]:
    """What each job segment of a run really ran, as its provenance.json records it: the strategy's record, read by
    the trainer from the prepared model (name, zero_stage, wrapper, parameters, sharded_parameters, shards,
    world_size: csi_dist/training/strategies.py `sharding`), and the segment's own world size."""
    segments = json.loads((Path(run_dir) / "provenance.json").read_text(encoding="utf-8"))["segments"]
    return [{**(segment.get("strategy") or {}), "segment_world_size": segment.get("world_size")}
            for segment in segments]


WRAPPERS = {"ddp": "DistributedDataParallel", "fsdp2": "FSDP", "deepspeed": "DeepSpeedEngine"}  # FSDP<model class>


def assert_strategies_ran(run_dir: Path, segments: list[tuple[str, int | None, int]], parameters: int) -> None:
    """Each job segment of the run ran `(strategy, ZeRO stage, world size)` on a model of `parameters` parameters,
    sharded as that strategy shards: FSDP2 and ZeRO-3 keep every parameter as shards (DTensors, ZeRO partitions)
    over the world size, ZeRO-1/2 partition the optimizer state over it, DDP shards nothing (and wraps the model in
    DistributedDataParallel on more processes than one: on one, it may run unwrapped). A silent fallback (ZeRO, or
    FSDP2 on 2 processes, run as DDP) fails here, whatever the weights say."""
    def wrapper_kind(name: str, world_size: int, wrapper: str | None) -> str | None:
        if name == "ddp" and world_size == 1:
            return None
        return next((kind for kind in WRAPPERS.values() if str(wrapper).startswith(kind)), wrapper)

    expected = [{"name": name, "zero_stage": zero_stage, "world_size": world_size, "segment_world_size": world_size,
                 "parameters": parameters,
                 "sharded_parameters": parameters if name == "fsdp2" or zero_stage == 3 else 0,
                 "shards": 1 if name == "ddp" else world_size,
                 "wrapper": wrapper_kind(name, world_size, WRAPPERS[name])}
                for name, zero_stage, world_size in segments]
    ran = [{**{key: record.get(key) for key in expected[0]},
            "wrapper": wrapper_kind(record.get("name"), record.get("world_size"), record.get("wrapper"))}
           for record in strategies_that_ran(run_dir)]
    assert ran == expected, f"{run_dir} ran {ran}, not {expected}"


class Payload:
    """A pickle whose unpickling runs `touch <marker>`: proof of code execution if the marker appears (a weights-only
    loader refuses it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
