"""Grading unlabelled radiographs with a trained run (`python -m csi_dist.predict`): the inputs (a folder or a CSV),
the shard writer's and the reader's image path, the model, the predictions CSV and the errors CSV."""
from __future__ import annotations

import io
import logging
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from csi_dist.cluster.preemption import PreemptionWatcher
from csi_dist.core.config import Config
from csi_dist.data.radiographs import (DEFAULT_JPEG_QUALITY, IMAGE_SUFFIXES, ImageError, build_image_index, image_for,
                                       image_suffix)
from csi_dist.data.shards.reader import ShardError, read_manifest
from csi_dist.data.unlabelled_images import ImageFiles, ImagePipeline, InputImage, collate_images, model_input
from csi_dist.data.workers import worker_options
from csi_dist.core.distributed import build_accelerator, configure_logging
from csi_dist.core.domain import CLASS_NAMES, CSV_FLOAT_FORMAT, CSV_SEPARATOR, FILE_ID_COLUMN, ZONE_NAMES
from csi_dist.evaluation.trained_model import load_trained_model, weights_path
from csi_dist.evaluation.calibration import read_calibration
from csi_dist.evaluation.inference import StopRequested
from csi_dist.evaluation.metrics import ahf_classes, csi_average, expected_csi, zone_predictions
from csi_dist.core.files import atomic_write

log = logging.getLogger("csi_dist.predict")

PATH_COLUMN = "path"
REASON_COLUMN = "reason"
ERRORS_SHOWN = 10


class PredictError(RuntimeError):
    """Inputs that cannot be predicted: no run directory, no such folder or CSV, no images, none readable."""


# ---------------------------------------------------------------------------------------------------- inputs


def folder_images(image_dir: Path) -> list[InputImage]:
    """Every image directly in `image_dir`, in the writer's way (one file per FileID), sorted by file name."""
    try:
        index = build_image_index(image_dir)
    except ImageError as error:  # the folder does not exist
        raise PredictError(f"--images {image_dir}: no such folder") from error
    if not index:
        raise PredictError(f"--images {image_dir}: no images found (files ending in {', '.join(IMAGE_SUFFIXES)})")
    candidates = sum(1 for path in image_dir.iterdir() if image_suffix(path) and path.is_file())
    if candidates > len(index):
        log.warning("%s: %d image file(s) share their FileID with another file; one per FileID is predicted "
                    "(suffix preference %s, as csi-shards write)", image_dir, candidates - len(index),
                    " > ".join(IMAGE_SUFFIXES))
    return [InputImage(position, file_id, path) for position, (file_id, path) in enumerate(index.items())]


def _read_list_csv(list_csv: Path) -> pd.DataFrame:
    if not list_csv.is_file():
        raise PredictError(f"--list {list_csv}: no such file")
    raw = list_csv.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s: not valid UTF-8; read as cp1252 (what Excel writes on Windows)", list_csv)
        text = raw.decode("cp1252")
    try:
        table = pd.read_csv(io.StringIO(text), sep=CSV_SEPARATOR, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise PredictError(f"--list {list_csv}: not a ';'-separated CSV: {error}") from None
    return table.rename(columns=lambda name: str(name).strip())


def _file_id_of(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def list_images(list_csv: Path, image_dir: Path | None) -> tuple[list[InputImage], list[tuple[InputImage, str]]]:
    """(images to read, images already known to be missing with the reason) of a --list CSV, in its row order."""
    table = _read_list_csv(list_csv)
    if table.empty:
        raise PredictError(f"--list {list_csv}: no rows")
    images, missing = [], []
    if PATH_COLUMN in table.columns:
        if image_dir is not None:
            log.warning("--list %s has a %s column: --images %s is not used", list_csv, PATH_COLUMN, image_dir)
        for position, row in enumerate(table.to_dict("records")):
            path = Path(row[PATH_COLUMN].strip())
            path = path if path.is_absolute() else list_csv.parent / path
            file_id = row.get(FILE_ID_COLUMN, "").strip() or _file_id_of(path)
            item = InputImage(position, file_id, path)
            if not row[PATH_COLUMN].strip():
                missing.append((item, f"MissingImageError: empty {PATH_COLUMN} on CSV line {position + 2}"))
            else:
                images.append(item)
        return images, missing
    if FILE_ID_COLUMN not in table.columns:
        raise PredictError(f"--list {list_csv}: needs a {PATH_COLUMN!r} or a {FILE_ID_COLUMN!r} column "
                           f"(';'-separated); found {list(table.columns)}")
    if image_dir is None:
        raise PredictError(f"--list {list_csv} has {FILE_ID_COLUMN} and no {PATH_COLUMN} column: give --images DIR, "
                           f"the folder of its images")
    try:
        index = build_image_index(image_dir)
    except ImageError as error:
        raise PredictError(f"--images {image_dir}: no such folder") from error
    for position, file_id in enumerate(table[FILE_ID_COLUMN].str.strip()):
        path = image_for(index, file_id)
        if path is None:
            missing.append((InputImage(position, file_id, image_dir / file_id),
                            f"MissingImageError: no {file_id}{{{','.join(IMAGE_SUFFIXES)}}} in {image_dir}"))
        else:
            images.append(InputImage(position, file_id, path))
    return images, missing


# ---------------------------------------------------------------------------------------------------- images


def image_pipeline(config, input_size: int) -> ImagePipeline:
    """The stored size and format of the run's shards (its manifest), else the model input size (logged)."""
    try:
        manifest = read_manifest(config.data.shard_dir)
    except ShardError as error:
        log.warning("the run's shard manifest is not available (%s): images are resized to the model input size "
                    "%d px directly instead of through the stored shard size", error, input_size)
        return ImagePipeline(input_size, "png", input_size, config.data.normalization)
    image_format = manifest.get("image_format", "png")
    if image_format == "jpg":
        log.warning("the run's shards store JPEG; their quality is not recorded, %d (csi-shards' default) is used",
                    DEFAULT_JPEG_QUALITY)
    log.info("images: as %s stores them (%d px %s), then %d px model input, %s normalization",
             config.data.shard_dir, int(manifest["image_size"]), image_format, input_size, config.data.normalization)
    return ImagePipeline(int(manifest["image_size"]), image_format, input_size, config.data.normalization)


# ---------------------------------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: list[InputImage], pipeline: ImagePipeline, accelerator,
                   channels_last: bool, batch_size: int, num_workers: int,
                   should_stop: Callable[[int], bool] | None = None, checked_batches: int = 0,
                   temperatures: list[float] | None = None) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """This rank's ({input index: 6 x 5 probabilities}, {input index: reason it could not be read}).

    `should_stop(batches_done)` (a collective: PreemptionWatcher.should_stop) is asked after each of the first
    `checked_batches` batches, the count every rank has; True raises StopRequested. `temperatures`: one a zone,
    for the calibrated probabilities (evaluation.calibration)."""
    model.eval()
    num_workers = num_workers if images else 0
    loader = DataLoader(ImageFiles(images, pipeline), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_images, pin_memory=accelerator.device.type == "cuda",
                        **worker_options(num_workers))
    probabilities: dict[int, np.ndarray] = {}
    failures: dict[int, str] = {}
    progress = tqdm(loader, total=len(loader), unit="batch", desc="predict",
                    disable=not accelerator.is_main_process or not sys.stderr.isatty())
    for batches_done, batch in enumerate(progress, start=1):
        failures.update(batch["failed"])
        if batch["image"] is not None:
            probabilities.update(zip(batch["index"], predict_batch(model, batch["image"], accelerator, channels_last,
                                                                        temperatures)))
        if should_stop is not None and batches_done <= checked_batches and should_stop(batches_done):
            raise StopRequested
    return probabilities, failures


def predict_batch(model: torch.nn.Module, images: torch.Tensor, accelerator, channels_last: bool,
                  temperatures: list[float] | None = None) -> np.ndarray:
    """Zone probabilities (B x 6 x 5, float64 as evaluate's) of one batch of model inputs, each zone's logits divided
    by its temperature when given."""
    images_on_device = images.to(accelerator.device, non_blocking=True)
    if channels_last:
        images_on_device = images_on_device.contiguous(memory_format=torch.channels_last)
    with accelerator.autocast():
        zone_logits = model(images_on_device)
    logits = zone_logits.float().double()  # the float32 logits evaluate gathers, softmaxed in float64 as it does
    if temperatures is not None:
        logits = logits / torch.tensor(temperatures, dtype=torch.float64, device=logits.device).reshape(1, -1, 1)
    return logits.softmax(dim=-1).cpu().numpy()


def gather(accelerator, local: object) -> list:
    """Every rank's object, in rank order, on every rank."""
    if accelerator.num_processes == 1:
        return [local]
    gathered: list = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, local)
    return gathered


def predictions_table(images: list[InputImage], zone_probs: np.ndarray, probabilities: str = "raw") -> pd.DataFrame:
    """FileID, path and evaluate's prediction columns (report._predictions_table) with the same metric functions."""
    columns: dict[str, object] = {FILE_ID_COLUMN: [image.file_id for image in images],
                                  PATH_COLUMN: [str(image.path) for image in images]}
    grades = zone_predictions(zone_probs)
    for zone, name in enumerate(ZONE_NAMES):
        columns[f"{name}_pred"] = grades[:, zone]
        for klass, class_name in enumerate(CLASS_NAMES):
            columns[f"{name}_p_{class_name}"] = zone_probs[:, zone, klass]
    average = csi_average(grades)
    columns["csi_avg_pred"] = average
    columns["csi_expected_pred"] = expected_csi(zone_probs)
    columns["ahf_class_pred"] = ahf_classes(average)
    columns["probabilities"] = probabilities  # raw | calibrated, as evaluate's column
    return pd.DataFrame(columns)


def errors_path(out: Path) -> Path:
    name = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{name}_errors.csv")


def write_csv(table: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda temporary: table.to_csv(temporary, sep=CSV_SEPARATOR, index=False,
                                                      float_format=CSV_FLOAT_FORMAT))


def heatmaps_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_heatmaps")


def predict(config: Config, run_dir: Path, weights: str, image_dir: Path | None, list_csv: Path | None, out: Path,
            batch_size: int | None, heatmaps: int = 0, calibrated: bool = False) -> int:
    """Predict every input image with the run's resolved `config`; returns the number predicted (0 raises
    PredictError after the errors file). `calibrated`: the temperature-scaled probabilities (CalibrationError when
    the weights have no calibration)."""
    if list_csv is not None:  # the inputs are checked before any process group or model is set up
        images, missing = list_images(list_csv, image_dir)
        source = f"--list {list_csv}"
    else:
        images, missing = folder_images(image_dir), []
        source = f"--images {image_dir}"
    temperatures = read_calibration(weights_path(run_dir, weights))["temperatures"] if calibrated else None
    accelerator = build_accelerator(config.training)
    configure_logging(accelerator)
    model, path, channels_last, input_size = load_trained_model(config, run_dir, weights, accelerator)
    pipeline = image_pipeline(config, input_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    log.info("%s: %d image(s) to predict (%d missing) with %s on %d process(es), %s probabilities", source,
             len(images), len(missing), path, world, "calibrated (temperature-scaled)" if calibrated else "raw")
    batch_size = batch_size or config.training.batch_size
    watcher = PreemptionWatcher(run_dir, check_every_steps=config.callbacks.preemption_check_every_steps)
    watcher.install()
    try:
        local = predict_images(model, images[rank::world], pipeline, accelerator, channels_last, batch_size,
                               config.data.num_workers,
                               should_stop=lambda batches: watcher.should_stop(batches - 1, accelerator),
                               checked_batches=math.ceil(len(images) // world / batch_size), temperatures=temperatures)
    except StopRequested:  # nothing partial is written: a prediction is rerun whole
        log.warning("prediction stopped by a preemption notice: nothing written")
        watcher.finish_after_checkpoint(accelerator, resumes_from="the start (a prediction is rerun whole)")
    probabilities: dict[int, np.ndarray] = {}
    failures: dict[int, str] = {item.index: reason for item, reason in missing}
    for rank_probs, rank_failures in gather(accelerator, local):
        probabilities.update(rank_probs)
        failures.update(rank_failures)
    accelerator.end_training()
    by_index = {item.index: item for item in images} | {item.index: item for item, _ in missing}
    if accelerator.is_main_process:
        errors = pd.DataFrame({FILE_ID_COLUMN: [by_index[index].file_id for index in sorted(failures)],
                               PATH_COLUMN: [str(by_index[index].path) for index in sorted(failures)],
                               REASON_COLUMN: [failures[index] for index in sorted(failures)]})
        write_csv(errors, errors_path(out))
        for index in sorted(failures)[:ERRORS_SHOWN]:
            log.warning("not predicted: %s: %s", by_index[index].path, failures[index])
        if probabilities:
            order = sorted(probabilities)
            write_csv(predictions_table([by_index[index] for index in order],
                                        np.stack([probabilities[index] for index in order]).astype(float),
                                        "calibrated" if calibrated else "raw"), out)
            log.info("predicted %d image(s) into %s; %d could not be read (listed in %s)", len(order), out,
                     len(failures), errors_path(out))
            if heatmaps:
                from csi_dist.evaluation.heatmaps import heatmaps_for_images  # captum: imported only when asked
                drawn = [(by_index[index].file_id, model_input(by_index[index].path, pipeline))
                         for index in order[:heatmaps]]
                heatmaps_for_images(model, drawn, heatmaps_path(out), accelerator.device)
                log.info("zone heatmaps of %d image(s) in %s", len(drawn), heatmaps_path(out))
    if not probabilities:
        raise PredictError(f"{source}: none of the {len(by_index)} image(s) could be read; reasons in "
                           f"{errors_path(out)}")
    return len(probabilities)
