"""Builders of small real label CSVs and image files for the data writer tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from csi_dist.domain import CSI_COLUMN, CSV_SEPARATOR, FILE_ID_COLUMN, ZONE_NAMES

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
