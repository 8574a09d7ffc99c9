"""The Python API: csi_dist's own parts for people who write their own training loop.

Everything here is a thin function over the code the command line runs (`csi_dist.train`, `csi_dist.evaluate`):
the same config loader, model factory, loss, optimizer and schedule, shard loaders, masked validation and metrics.
It keeps the names of the seed project's API (train_model, train_epoch, validate_epoch, create_optimizer, ...).
The loop helpers (`train_epoch`, `validate_epoch`, `predict`) run in ONE process; `train_model` runs the real
trainer, with its checkpoints, resume, early stopping and logging.

A custom loop on the phantom data (`python -m csi_dist.shards --demo 600`):

    import torch
    from csi_dist import api

    config = api.load_config(api.DEMO_CONFIG)  # the repository's configs/demo.ini, from any directory
    torch.manual_seed(config.training.seed)
    model = api.build_model(config)
    train_loader, val_loader = api.make_loaders(config)
    criterion = api.create_criterion(config)
    optimizer = api.create_optimizer(model, config)
    scheduler = api.create_scheduler(optimizer, config, steps_per_epoch=len(train_loader))
    for epoch in range(config.training.n_epochs):
        train_loss = api.train_epoch(model, train_loader, criterion, optimizer, scheduler=scheduler)
        val = api.validate_epoch(model, val_loader, criterion)  # {"loss": ..., "f1_weighted": ..., ...}
        scheduler.after_evaluation(val["loss"])

Or the whole trainer in this process: `result = api.train_model(api.DEMO_CONFIG, "checkpoints/demo")`, then
`api.load_checkpoint(model, result.run_dir)` loads its best weights.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from csi_dist.core.config import (DEMO_CONFIG, CallbacksConfig, Config, ModelConfig, OptimizationConfig, SECTION_FIELDS,
                                  load_config)
from csi_dist.data.shards.reader import LoaderSettings, ShardSet, build_loader, open_split
from csi_dist.core.domain import metric_direction, monitored_metric
from csi_dist.evaluation.inference import SplitPredictions, device_batches, predict_split
from csi_dist.evaluation.metrics import compute_metrics
from csi_dist.core.exit_codes import describe
from csi_dist.core.files import atomic_write_json
from csi_dist.model.loss import WeightedCSILoss
from csi_dist.model.factory import build_model as _build_model
from csi_dist.model.factory import model_input_size, unwrapped_model
from csi_dist.core.run_dir import RunDir, default_run_dir
from csi_dist.training.accumulation import BufferSnapshot
from csi_dist.training.checkpoint_files import STATE_FILE, CheckpointError, load_weights
from csi_dist.training.early_stopping import EarlyStopping
from csi_dist.training.schedules import LearningRateSchedule, build_optimizer
from csi_dist.training.step import SingleProcess, train_step
from csi_dist.training.strategies import SingleProcessStrategy

__all__ = [
    "Config", "load_config", "train_model", "TrainResult", "build_model", "create_criterion", "WeightedCSILoss",
    "create_optimizer", "create_scheduler", "LearningRateSchedule", "EarlyStopping", "create_early_stopping",
    "make_loaders", "ShardLoader", "sample_mask", "train_epoch", "validate_epoch", "predict", "load_checkpoint",
    "CheckpointError", "AverageMeter", "MetricsTracker", "compute_metrics", "compute_f1_metrics",
    "compute_precision_recall", "compute_csi_average_metrics", "compute_ahf_classification_metrics",
]

log = logging.getLogger("csi_dist.api")

ConfigLike = Config | str | Path


def _as_config(config: ConfigLike, overrides: Sequence[str] = ()) -> Config:
    """A Config from a Config or an INI path, with `section.key=value` overrides applied (and everything checked
    by load_config, as on the command line)."""
    if isinstance(config, Config):
        if not overrides:
            return config
        current = [f"{section}.{key}={value}" for section in SECTION_FIELDS
                   for key, value in dataclasses.asdict(getattr(config, section)).items()]
        return load_config(None, [*current, *overrides])
    return load_config(config, list(overrides))


# --- the whole trainer ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What `train_model` leaves: the run directory, the trainer's exit status and its per-evaluation history
    (training_history.json: epoch, global_step, lr, val_loss and val_<metric> per evaluation)."""

    run_dir: Path
    status: int
    history: list[dict] = field(default_factory=list)
    monitor: str = "val_loss"  # callbacks.monitor: what "best" means

    def __repr__(self) -> str:
        """One line a reader can act on: TrainResult(checkpoints/demo, finished (exit 0), 4 evaluations,
        best val_loss 0.6123 at epoch 3, best weights ..., last weights ...); the history stays in .history."""
        parts = [str(self.run_dir), describe(self.status), f"{len(self.history)} evaluation(s)"]
        key = f"val_{monitored_metric(self.monitor)}"
        scored = [record for record in self.history if isinstance(record.get(key), (int, float))
                  and math.isfinite(record[key])]
        if scored:
            pick = min if metric_direction(self.monitor) == "min" else max
            best = pick(scored, key=lambda record: record[key])
            parts.append(f"best {key} {best[key]:.4g} at epoch {best.get('epoch')}")
        parts += [f"best weights {self.best_weights or 'none'}", f"last weights {self.last_weights or 'none'}"]
        return f"TrainResult({', '.join(parts)})"

    @property
    def best_weights(self) -> Path | None:
        path = RunDir(self.run_dir).best_weights
        return path if path.is_file() else None

    @property
    def last_weights(self) -> Path | None:
        path = RunDir(self.run_dir).last_weights
        return path if path.is_file() else None


def train_model(config: ConfigLike, run_dir: str | Path | None = None, overrides: Sequence[str] = (),
                resume: str = "auto", epoch_end_hook: Callable[[dict, object], bool] | None = None) -> TrainResult:
    """Run the trainer of `csi_dist.train` in this process: checkpoints, resume, early stopping, best/last weights,
    TensorBoard and W&B, exactly as `python -m csi_dist.train --config ... --run-dir ... --set ...`.

    `config` is a Config or an INI path; `overrides` are `section.key=value` strings; `run_dir` defaults to
    <logging.output_dir>/<logging.run_name> as on the command line. `resume` is "auto" (continue from the newest
    checkpoint of run_dir: a finished run is not trained again), "never" (a new run; ConfigError when run_dir holds
    one), "fresh" (the run in run_dir moved aside to <run_dir>.old-<date>, then a new run), or a checkpoint path.
    `epoch_end_hook` (record, accelerator) -> bool runs after each evaluation; True stops training. Errors are raised
    (ConfigError, ShardError, TooManyBadSteps, ...) where the command line turns them into exit statuses. Under
    `python -m csi_dist.launcher` (or torchrun) every rank calls it and they train together.
    """
    from csi_dist.training.loop import train

    resolved = _as_config(config, overrides)
    directory = Path(run_dir) if run_dir is not None else default_run_dir(
        resolved.logging.output_dir, resolved.logging.run_name, resolved.model.model_arch)
    status = train(resolved, directory, resume, epoch_end_hook)
    history_path = RunDir(directory).history
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else []
    return TrainResult(directory, status, history, resolved.callbacks.monitor)


# --- the parts of a loop -------------------------------------------------------------------------------------------
def build_model(cfg: ConfigLike | ModelConfig, image_size: int | None = None) -> torch.nn.Module:
    """The CSI model (single-channel input, B x 6 x 5 zone logits) for a Config, an INI path or a ModelConfig.

    From a Config the input size is `data.image_size` (0: the backbone's native size), as the trainer builds it.
    Weights are random (or `model.pretrained_weights` for the backbone); seed torch first for a reproducible start.
    """
    if isinstance(cfg, ModelConfig):
        return _build_model(cfg, image_size)
    config = _as_config(cfg)
    return _build_model(config.model, image_size or model_input_size(config.model, config.data.image_size))


def create_criterion(config: ConfigLike) -> WeightedCSILoss:
    """WeightedCSILoss(loss.unknown_weight): cross-entropy with class weights [1, 1, 1, 1, unknown_weight]."""
    return WeightedCSILoss(_as_config(config).loss.unknown_weight)


def create_optimizer(model: torch.nn.Module, config: ConfigLike | OptimizationConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over the trainable parameters, from the [Optimization] section."""
    cfg = config if isinstance(config, OptimizationConfig) else _as_config(config).optimization
    return build_optimizer(model, cfg)


def create_scheduler(optimizer: torch.optim.Optimizer, config: ConfigLike, steps_per_epoch: int,
                     n_epochs: int | None = None) -> LearningRateSchedule:
    """The trainer's learning-rate schedule: linear warmup (optimization.warmup_epochs), then ReduceLROnPlateau,
    StepLR, cosine or none.

    `steps_per_epoch` is the optimizer steps of one epoch (`len(train_loader)`); `n_epochs` defaults to
    training.n_epochs (the cosine length). It is not a torch scheduler: call
      - `after_optimizer_step()` after every optimizer step (warmup, cosine),
      - `after_epoch()` at the end of every epoch (StepLR),
      - `after_evaluation(value)` after every validation with the monitored value (ReduceLROnPlateau, which
        minimises or maximises it as callbacks.monitor says).
    `train_epoch(..., scheduler=...)` makes the first two calls; `after_evaluation` is yours.
    """
    resolved = _as_config(config)
    return LearningRateSchedule(optimizer, resolved.optimization, steps_per_epoch=steps_per_epoch,
                                n_epochs=n_epochs or resolved.training.n_epochs,
                                monitor_mode=metric_direction(resolved.callbacks.monitor))


def create_early_stopping(config: ConfigLike | CallbacksConfig) -> EarlyStopping:
    """EarlyStopping(mode, patience, min_delta) from [Callbacks]: `update(value, epoch)` returns True on a new best,
    `should_stop` turns True after `patience` evaluations without improvement (min for val_loss, max for metrics)."""
    cfg = config if isinstance(config, CallbacksConfig) else _as_config(config).callbacks
    return EarlyStopping(metric_direction(cfg.monitor), cfg.early_stopping_patience, cfg.early_stopping_min_delta)


class ShardLoader:
    """One split's batches from the shards, in one process. Each batch is a dict: "image" (B x 1 x S x S float),
    "zones" (B x 6 long), "csi", "ahf" (B float, NaN if unknown), "is_padding" and "decode_failed" (B bool: rows
    that must not count, see `sample_mask`), "sample_index", "file_id".

    Every pass over a training loader is the next epoch (new shuffle and augmentation, as in the trainer);
    `set_epoch(n)` chooses the epoch of the next pass. Validation and test loaders give the same batches every pass.
    """

    def __init__(self, shard_set: ShardSet, settings: LoaderSettings, epoch: int = 0):
        self.shard_set, self.settings, self.epoch = shard_set, settings, epoch

    @property
    def num_samples(self) -> int:
        return self.shard_set.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_loader(self, epoch: int):
        return build_loader(self.shard_set, self.settings, epoch=epoch, rank=0, world_size=1,
                            pin_memory=torch.cuda.is_available())

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.settings.batch_size)

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        if self.settings.shuffle:
            self.epoch += 1
        return iter(self._epoch_loader(epoch))


def make_loaders(config: ConfigLike, splits: Sequence[str] = ("train", "val"),
                 overrides: Sequence[str] = ()) -> tuple[ShardLoader, ...]:
    """Loaders of `splits` of data.shard_dir, one per split in that order (default: train, val). The train split
    is shuffled and augmented (data.augment), the others are not; batch size, workers, normalization and image size
    come from the config (image size: data.image_size, or the backbone's native size when 0)."""
    resolved = _as_config(config, overrides)
    image_size = model_input_size(resolved.model, resolved.data.image_size)
    return tuple(ShardLoader(open_split(resolved.data.shard_dir, split),
                             LoaderSettings.from_config(resolved, image_size, train=split == "train"))
                 for split in splits)


def sample_mask(batch: dict) -> torch.Tensor:
    """The rows of a batch that count (not padding, decodable); the loss and metrics ignore the others."""
    return ~batch["is_padding"] & ~batch["decode_failed"]


def _device_of(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def train_epoch(model: torch.nn.Module, loader, criterion: WeightedCSILoss, optimizer: torch.optim.Optimizer,
                device: str | torch.device | None = None, scheduler: LearningRateSchedule | None = None,
                grad_clip_norm: float = 0.0, autocast_dtype: torch.dtype | None = None) -> float:
    """One pass over `loader` with an optimizer step per batch; returns the epoch's mean weighted loss.

    As in the trainer: padding and undecodable rows are masked out of the loss (criterion.weighted_sum with the
    batch's sample mask), the mean is class-weighted over all zones of the epoch, gradients are clipped to
    `grad_clip_norm` (0: no clipping; optimization.grad_clip_norm in a config) and a step whose loss or gradients
    are not finite is skipped with a warning (weights, BatchNorm buffers, schedule and epoch mean untouched).
    `device` defaults to the model's; `autocast_dtype` (e.g. torch.bfloat16) runs the forward pass under autocast. With a `scheduler` (create_scheduler) it calls
    after_optimizer_step() after each step and after_epoch() at the end. No gradient accumulation (the trainer has it).
    """
    device = _device_of(model, device)
    criterion = criterion.to(device)
    process, strategy = SingleProcess(device, autocast_dtype), SingleProcessStrategy(grad_clip_norm)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    meter = AverageMeter()
    buffers = BufferSnapshot(model)  # a skipped step leaves BatchNorm's statistics as they were, as in the trainer
    for step, micro_batch in enumerate(device_batches(loader, device, channels_last=False)):
        # the trainer's step (training/step.py) on a window of one batch: its loss is the batch's weighted mean
        losses = []
        update = train_step(model, [micro_batch], criterion=criterion, strategy=strategy, optimizer=optimizer,
                            accelerator=process, buffers=buffers,
                            after_micro_batch=lambda batch, images, loss, seconds: losses.append(loss.detach()))
        if not update.stepped():  # nothing of it counts: not the weights, the buffers, the schedule or the epoch's mean
            log.warning("non-finite loss or gradients at step %d: step skipped", step)
            continue
        if scheduler is not None:
            scheduler.after_optimizer_step()
        _, _, zone_targets, mask = micro_batch
        meter.update(float(losses[0]), n=float(criterion.zone_weights(zone_targets, mask).sum()))
    if scheduler is not None:
        scheduler.after_epoch()
    return meter.avg


def predict(model: torch.nn.Module, loader, criterion: WeightedCSILoss | None = None,
            device: str | torch.device | None = None,
            autocast_dtype: torch.dtype | None = None) -> SplitPredictions:
    """Every real sample of the loader's split once, in manifest order (padding and undecodable images dropped):
    file_ids, zone_probs (N x 6 x 5 softmax), zone_targets (N x 6), csi_truth, ahf_truth (N, NaN if unknown), the
    weighted loss and the decode failures. The evaluation code of the trainer and `csi_dist.evaluate`."""
    device = _device_of(model, device)
    criterion = (criterion or WeightedCSILoss()).to(device)
    return predict_split(model, loader, criterion, SingleProcess(device, autocast_dtype), channels_last=False)


def validate_epoch(model: torch.nn.Module, loader, criterion: WeightedCSILoss,
                   device: str | torch.device | None = None,
                   autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """The split's weighted loss and every metric, as the trainer validates: {"loss", "decode_failures", and the
    keys of compute_metrics: f1_weighted, f1_macro, accuracy, csi_mae, ahf_accuracy, per-zone "<zone>/..." ...}.
    Eval mode, no gradients; the model is left in eval mode."""
    predictions = predict(model, loader, criterion, device, autocast_dtype)
    metrics = compute_metrics(predictions.zone_probs, predictions.zone_targets, predictions.csi_truth,
                              predictions.ahf_truth) if predictions.file_ids else {}
    return {"loss": predictions.loss, "decode_failures": predictions.decode_failures, **metrics}


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    """Load trained weights into `model` in place; returns the file loaded.

    `path` is a .safetensors weights file or a run directory (its weights/best.safetensors, else
    weights/last.safetensors). The resumable checkpoints under <run_dir>/checkpoints/ are the trainer's, for
    `train_model(..., resume=...)`, not for this function. The model must be the run's architecture and input size
    (build_model of the run's resolved_config.ini); CheckpointError otherwise.
    """
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        best, last = run.relative(run.best_weights), run.relative(run.last_weights)
        if (path / STATE_FILE).is_file():
            raise CheckpointError(f"{path} is a resumable trainer checkpoint; load the weights of its run directory "
                                  f"instead ({best} or {last})")
        found = next((candidate for candidate in (run.best_weights, run.last_weights) if candidate.is_file()), None)
        if found is None:
            raise CheckpointError(f"{path}: no {best} or {last} (not a finished run directory?)")
        path = found
    try:
        unwrapped_model(model).load_state_dict(load_weights(path))
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit this model: {error}") from None
    return path


# --- bookkeeping -----------------------------------------------------------------------------------------------------
class AverageMeter:
    """A running weighted mean: `update(value, n)` adds n items of mean `value`; `val`, `sum`, `count`, `avg`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val, self.sum, self.count = math.nan, 0.0, 0.0

    def update(self, value: float, n: float = 1) -> None:
        self.val = float(value)
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else math.nan


class MetricsTracker:
    """A history of per-epoch records (dicts), in the format of the trainer's training_history.json."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def add(self, record: dict | None = None, **values) -> dict:
        """Append one epoch's record: `add({"epoch": 0, "val_loss": 0.9})` or `add(epoch=0, val_loss=0.9)`."""
        entry = {**(record or {}), **values}
        self.history.append(entry)
        return entry

    def __len__(self) -> int:
        return len(self.history)

    def __getitem__(self, key: str) -> list:
        """One value over the epochs (None where a record lacks it): tracker["val_loss"]."""
        return [entry.get(key) for entry in self.history]

    def best(self, key: str, mode: str | None = None) -> dict | None:
        """The record with the best finite `key`; mode "min" or "max", by default the direction callbacks.monitor
        gives a validation metric (val_loss min, val_f1_weighted max, ...) and "min" for any other key."""
        if mode is None:
            try:
                mode = metric_direction(key)
            except ValueError:
                mode = "min"
        scored = [entry for entry in self.history
                  if isinstance(entry.get(key), (int, float)) and math.isfinite(entry[key])]
        if not scored:
            return None
        return (min if mode == "min" else max)(scored, key=lambda entry: entry[key])

    def save(self, path: str | Path) -> None:
        """Strict JSON (NaN as null), written atomically, like training_history.json."""
        atomic_write_json(Path(path), self.history)


# --- metrics: compute_metrics split as the seed's four functions ---------------------------------------------------
def _metric_group(key: str) -> str:
    if key == "n_images":
        return "shared"
    if key.startswith("csi_"):
        return "csi"
    if key.startswith("ahf_"):
        return "ahf"
    return "f1" if "f1" in key else "precision_recall"


def _subset(metrics: dict[str, float], group: str) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if _metric_group(key) in (group, "shared")}


def compute_f1_metrics(zone_probs: np.ndarray, zone_targets: np.ndarray) -> dict[str, float]:
    """F1 over graded zones (predictions = argmax of the N x 6 x 5 probabilities, targets N x 6, 4 = unknown):
    f1_macro, f1_weighted, f1_macro_zone_mean, <zone>/f1_macro, <zone>/f1_weighted, and n_images."""
    return _subset(compute_metrics(zone_probs, zone_targets), "f1")


def compute_precision_recall(zone_probs: np.ndarray, zone_targets: np.ndarray) -> dict[str, float]:
    """precision_macro, recall_macro, accuracy, unknown_precision, unknown_recall, the per-zone
    <zone>/precision_macro, <zone>/recall_macro, <zone>/accuracy, <zone>/support, n_graded_zones and n_images."""
    return _subset(compute_metrics(zone_probs, zone_targets), "precision_recall")


def compute_csi_average_metrics(zone_probs: np.ndarray, zone_targets: np.ndarray,
                                csi_truth: np.ndarray | None = None) -> dict[str, float]:
    """The per-image CSI average (mean of the graded zones) against the targets' average: csi_mae, csi_rmse,
    csi_pearson_r, csi_n_images; with `csi_truth` (the CSV csi column, NaN where missing) also csi_csv_*."""
    return _subset(compute_metrics(zone_probs, zone_targets, csi_truth=csi_truth), "csi")


def compute_ahf_classification_metrics(zone_probs: np.ndarray, zone_targets: np.ndarray,
                                       ahf_truth: np.ndarray | None = None) -> dict[str, float]:
    """The AHF risk class of the CSI average (low/medium/high): ahf_accuracy, ahf_f1_macro; with `ahf_truth` (0/1
    labels, NaN where missing) also ahf_auroc and ahf_auroc_n_images."""
    return _subset(compute_metrics(zone_probs, zone_targets, ahf_truth=ahf_truth), "ahf")
