"""Synthetic "phantom" chest radiographs whose six zone grades are visibly encoded, with a users'-format label CSV."""
from __future__ import annotations

import csv
import functools
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from csi_dist.core.domain import (
    AHF_COLUMN,
    CSI_COLUMN,
    CSV_SEPARATOR,
    FILE_ID_COLUMN,
    NUM_ZONES,
    PATIENT_COLUMN,
    UNKNOWN_CLASS,
    ZONE_NAMES,
)

logger = logging.getLogger(__name__)

LABELS_NAME = "labels.csv"
IMAGES_DIR_NAME = "images"
# Geometry in units of the image side. Patient right is on the image LEFT (standard PA view).
LUNG_CENTER_Y, LUNG_HALF_HEIGHT, LUNG_HALF_WIDTH, LUNG_OFFSET_X = 0.47, 0.29, 0.12, 0.17
OPACITY_PER_GRADE = 0.11  # brightness added to a zone per grade, on a 0-1 scale where a clear lung is ~0.25
UNKNOWN_BRIGHTNESS = 0.97  # an ungradable zone is covered by a near-saturated blank patch


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coordinates = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coordinates[:, None], coordinates[None, :]


def _soft_ellipse(rows, cols, center_y, center_x, half_height, half_width, edge: float = 10.0) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a soft rim so edges do not alias at small sizes."""
    radius2 = np.square((rows - center_y) * (1.0 / half_height)) + np.square((cols - center_x) * (1.0 / half_width))
    return np.clip(edge - radius2 * edge, 0.0, 1.0, out=radius2)


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 8) -> np.ndarray:
    """A smooth random texture in [0, 1] (bilinear upsampling of a coarse random grid)."""
    coarse = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    return np.asarray(coarse.resize((size, size), resample=Image.Resampling.BILINEAR))


def zone_boxes(size: int, shift_y: float = 0.0, shift_x: float = 0.0, scale: float = 1.0) -> dict[str, tuple]:
    """Pixel box (top, bottom, left, right) of each zone for a phantom with the given jitter (none by default)."""
    boxes = {}
    for zone in ZONE_NAMES:
        side, level = zone.split("_")
        center_x = 0.5 + shift_x + (-LUNG_OFFSET_X if side == "right" else LUNG_OFFSET_X) * scale
        top = LUNG_CENTER_Y + shift_y - LUNG_HALF_HEIGHT * scale
        third = 2 * LUNG_HALF_HEIGHT * scale / 3
        level_index = ("sup", "mid", "inf").index(level)
        boxes[zone] = tuple(int(round(value * size)) for value in (
            top + level_index * third, top + (level_index + 1) * third,
            center_x - LUNG_HALF_WIDTH * scale, center_x + LUNG_HALF_WIDTH * scale))
    return boxes


def zone_masks(size: int) -> np.ndarray:
    """6 x size x size booleans, True inside each zone's box of an unjittered phantom (in ZONE_NAMES order)."""
    masks = np.zeros((NUM_ZONES, size, size), dtype=bool)
    for index, (top, bottom, left, right) in enumerate(zone_boxes(size)[zone] for zone in ZONE_NAMES):
        masks[index, top:bottom, left:right] = True
    return masks


def phantom_image(zones: Sequence[int], rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One size x size uint8 radiograph: dark background, bright body and mediastinum, two dark lungs.

    Each zone (sup/mid/inf = thirds of the lung height) gets a textured opacity of `OPACITY_PER_GRADE` x grade;
    an unknown zone (4) is covered by a blank bright patch. Position, size, brightness and noise are jittered.
    """
    rows, cols = _grid(size)
    # Python floats keep the arithmetic in float32 (a numpy float64 scalar would upcast every image op).
    shift_y, shift_x = (float(value) for value in rng.uniform(-0.03, 0.03, 2))
    scale = float(rng.uniform(0.94, 1.06))
    body = _soft_ellipse(rows, cols, 0.55 + shift_y, 0.5 + shift_x, 0.5 * scale, 0.43 * scale)
    image = 0.05 + 0.5 * body
    image += 0.06 * np.clip(1.0 - np.abs(cols - 0.5 - shift_x) / 0.035, 0.0, 1.0) * body  # spine
    texture = _smooth_field(rng, size)
    rib_phase = float(rng.uniform(0, 2 * math.pi))
    boxes = zone_boxes(size, shift_y, shift_x, scale)
    for side, offset in (("right", -LUNG_OFFSET_X), ("left", LUNG_OFFSET_X)):
        lung = _soft_ellipse(rows, cols, LUNG_CENTER_Y + shift_y, 0.5 + shift_x + offset * scale,
                             LUNG_HALF_HEIGHT * scale, LUNG_HALF_WIDTH * scale)
        ribs = 0.03 * np.sin(rows * (2 * math.pi * 9) + rib_phase)
        image += lung * (ribs - 0.32)
        for level in ("sup", "mid", "inf"):
            zone = f"{side}_{level}"
            grade = int(zones[ZONE_NAMES.index(zone)])
            if grade in (0, UNKNOWN_CLASS):
                continue
            top, bottom, _, _ = boxes[zone]
            opacity = OPACITY_PER_GRADE * grade * (0.7 + 0.6 * texture[top:bottom])
            image[top:bottom] += lung[top:bottom] * opacity
    image += 0.13 * _soft_ellipse(rows, cols, 0.62 + shift_y, 0.54 + shift_x, 0.18 * scale, 0.12 * scale)  # heart
    image = image * float(rng.uniform(0.85, 1.15)) + float(rng.uniform(-0.05, 0.05))
    image += 0.025 * rng.standard_normal(image.shape, dtype=np.float32)
    for zone, grade in zip(ZONE_NAMES, zones):
        if int(grade) == UNKNOWN_CLASS:
            top, bottom, left, right = boxes[zone]
            image[max(top, 0):bottom, max(left, 0):right] = UNKNOWN_BRIGHTNESS
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _patient_zones(rng: np.random.Generator, severity: float, unknown_fraction: float,
                   independent_zones: bool) -> np.ndarray:
    if independent_zones:  # each zone its own grade: only a zone's own region tells its grade
        zones = rng.integers(0, 4, NUM_ZONES)
        zones[rng.random(NUM_ZONES) < unknown_fraction] = UNKNOWN_CLASS
        return zones
    # Congestion is usually worse at the bases: inferior zones a bit higher, superior a bit lower.
    level_bias = np.array([{"sup": -0.3, "mid": 0.0, "inf": 0.35}[zone.split("_")[1]] for zone in ZONE_NAMES])
    zones = np.clip(np.rint(severity + level_bias + rng.normal(0.0, 0.5, NUM_ZONES)), 0, 3).astype(int)
    zones[rng.random(NUM_ZONES) < unknown_fraction] = UNKNOWN_CLASS
    return zones


def _follow_up_zones(rng: np.random.Generator, zones: np.ndarray, unknown_fraction: float) -> np.ndarray:
    follow_up = zones.copy()
    graded = follow_up != UNKNOWN_CLASS
    change = rng.integers(-1, 2, NUM_ZONES) * (rng.random(NUM_ZONES) < 0.4)
    follow_up[graded] = np.clip(follow_up[graded] + change[graded], 0, 3)
    follow_up[rng.random(NUM_ZONES) < unknown_fraction] = UNKNOWN_CLASS
    return follow_up


def phantom_labels(n_images: int, seed: int = 0, unknown_fraction: float = 0.1,
                   second_image_fraction: float = 0.2, independent_zones: bool = False) -> list[dict]:
    """Label rows for `n_images` images: 8-digit FileIDs, patients of one or two images, zones, csi and ahf.

    A patient's zones follow a latent severity (correlated, like real congestion), or with `independent_zones`
    are drawn each on its own (so a zone's grade can only be read from its own region: the heatmap check).
    ahf (a patient-level 0/1 diagnosis) is drawn with probability sigmoid(2.5 x (severity - 1.5)) from the
    patient's latent severity, so it correlates with the CSI but not perfectly.
    """
    rng = np.random.default_rng([seed, 0])
    file_ids = 30_000_000 + int(rng.integers(0, 1_000_000)) + np.cumsum(rng.integers(1, 40, n_images))
    rows: list[dict] = []
    patient = 0
    while len(rows) < n_images:
        patient += 1
        severity = 3.0 * rng.beta(1.4, 1.8)
        ahf = int(rng.random() < 1.0 / (1.0 + math.exp(-2.5 * (severity - 1.5))))
        zones = _patient_zones(rng, severity, unknown_fraction, independent_zones)
        images = [zones]
        if rng.random() < second_image_fraction and len(rows) + 2 <= n_images:
            images.append(_follow_up_zones(rng, zones, unknown_fraction))
        for image_zones in images:
            graded = image_zones[image_zones != UNKNOWN_CLASS]
            rows.append({FILE_ID_COLUMN: str(file_ids[len(rows)]), "zones": image_zones.tolist(),
                         CSI_COLUMN: round(float(graded.mean()), 4) if graded.size else None,
                         PATIENT_COLUMN: f"P{patient:05d}", AHF_COLUMN: ahf})
    return rows


def write_phantom_csv(rows: list[dict], path: Path) -> None:
    """Write rows in the users' format: `;`-separated, unknown zones and undefined csi as empty cells."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=CSV_SEPARATOR, lineterminator="\n")
        writer.writerow([FILE_ID_COLUMN, *ZONE_NAMES, CSI_COLUMN, PATIENT_COLUMN, AHF_COLUMN])
        for row in rows:
            zone_cells = ["" if grade == UNKNOWN_CLASS else grade for grade in row["zones"]]
            csi = "" if row[CSI_COLUMN] is None else row[CSI_COLUMN]
            writer.writerow([row[FILE_ID_COLUMN], *zone_cells, csi, row[PATIENT_COLUMN], row[AHF_COLUMN]])


def _write_phantom_image(task: tuple) -> None:
    path, zones, seed, index, image_size = task
    pixels = phantom_image(zones, np.random.default_rng([seed, index + 1]), image_size)
    Image.fromarray(pixels).save(path, compress_level=1)


def generate_phantom(out_dir: str | Path, n_images: int, image_size: int = 256, seed: int = 0,
                     unknown_fraction: float = 0.1, second_image_fraction: float = 0.2,
                     workers: int | None = None, independent_zones: bool = False) -> Path:
    """Write `n_images` phantom PNGs to out_dir/images/<FileID>.png and out_dir/labels.csv; return the CSV path.

    Deterministic for a seed whatever `workers` is: image i is drawn from its own generator seeded by (seed, i + 1).
    `workers` processes draw the images (default: the CPU cores this process may use; 1 = no subprocess).
    """
    if n_images < 1:
        raise ValueError(f"n_images={n_images}; expected at least 1")
    out_dir = Path(out_dir)
    image_dir = out_dir / IMAGES_DIR_NAME
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = phantom_labels(n_images, seed, unknown_fraction, second_image_fraction, independent_zones)
    tasks = [(image_dir / f"{row[FILE_ID_COLUMN]}.png", row["zones"], seed, index, image_size)
             for index, row in enumerate(rows)]
    workers = min(workers or len(os.sched_getaffinity(0)), max(1, n_images // 64))
    if workers <= 1:
        for task in tasks:
            _write_phantom_image(task)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_write_phantom_image, tasks, chunksize=32):
                pass
    csv_path = out_dir / LABELS_NAME
    write_phantom_csv(rows, csv_path)
    logger.info("phantom: wrote %d images (%d px) and %s", n_images, image_size, csv_path)
    return csv_path
