"""Distributed inference over a split: per-rank forward passes, one gather, padding dropped, exact global loss."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from csi_dist.data.shards.reader import EpochLoader, finish_on_device
from csi_dist.model.loss import WeightedCSILoss


@dataclass
class SplitPredictions:
    """Every real sample of a split exactly once, in manifest order (identical on every rank)."""

    file_ids: list[str]
    zone_probs: np.ndarray  # (N, 6, 5) float64 softmax of zone_logits
    zone_targets: np.ndarray  # (N, 6)
    csi_truth: np.ndarray  # (N,) NaN where the CSV had none
    ahf_truth: np.ndarray  # (N,) NaN where the CSV had none
    loss: float  # weighted CE over all real, decodable samples
    decode_failures: int
    # the label CSV's extra columns (site, sex, ...): {column: one text or None per image}; {} for shards without
    metadata: dict[str, list[str | None]] = field(default_factory=dict)
    patient_ids: list[str | None] = field(default_factory=list)  # None where the shards know no patient
    zone_logits: np.ndarray | None = None  # (N, 6, 5) float32, for temperature scaling (evaluation.calibration)


def move_batch(batch: dict, device: torch.device, channels_last: bool,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, zone targets and the mask of samples that count (not padding, decodable) on the device."""
    images = finish_on_device(batch, device)  # uint8 pixels are normalised and augmented there (data.gpu_augment)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    zone_targets = batch["zones"].to(device, non_blocking=True)
    # combined on the device: a mask made on the host would be pageable memory, whose copy waits for the stream
    sample_mask = ~(batch["is_padding"].to(device, non_blocking=True) | batch["decode_failed"].to(device,
                                                                                             non_blocking=True))
    return images, zone_targets, sample_mask


def device_batches(loader, device: torch.device, channels_last: bool,
                   ) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(host batch, images, zone targets, sample mask) per batch of `loader`, the tensors on `device`.

    On CUDA the next batch is copied (and, from uint8 pixels, finished) on a side stream while the current step
    computes (a copy on the compute stream stalls the GPU for every batch: about 50 MB of float32 images at bs256
    224 px, 13 MB as uint8). Same values, same order.
    """
    if device.type != "cuda":
        for batch in loader:
            yield batch, *move_batch(batch, device, channels_last)
        return
    copy_stream = torch.cuda.Stream(device)
    compute_stream = torch.cuda.current_stream(device)
    pending = None
    for batch in loader:
        with torch.cuda.stream(copy_stream):
            moved = move_batch(batch, device, channels_last)
        if pending is not None:
            yield pending  # the step on it is enqueued while the copy above runs
        compute_stream.wait_stream(copy_stream)
        for tensor in moved:
            tensor.record_stream(compute_stream)  # not reused by the copy stream before the step has read it
        pending = (batch, *moved)
    if pending is not None:
        yield pending


class StopRequested(Exception):
    """Every rank agreed to stop (a preemption notice) in the middle of a split's predictions."""


@torch.no_grad()
def predict_split(model: torch.nn.Module, loader: EpochLoader, criterion: WeightedCSILoss, accelerator,
                  channels_last: bool, should_stop: Callable[[int], bool] | None = None) -> SplitPredictions:
    """Predictions of every rank's part of a split, gathered. `should_stop(batches_done)` is asked after each batch
    (the same answer on every rank, e.g. PreemptionWatcher.should_stop): True raises StopRequested, so a notice
    that arrives during a long validation is not lost."""
    model.eval()
    logits, targets, csi, ahf, index, padding, failed = [], [], [], [], [], [], []
    file_ids, metadata, patients = [], [], []
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    weight_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        images, zone_targets, sample_mask = move_batch(batch, accelerator.device, channels_last)
        with accelerator.autocast():
            zone_logits = model(images)
        batch_loss_sum, batch_weight = criterion.weighted_sum(zone_logits, zone_targets, sample_mask)
        loss_sum += batch_loss_sum.double()
        weight_sum += batch_weight.double()
        logits.append(zone_logits.float())
        targets.append(zone_targets)
        csi.append(batch["csi"].to(accelerator.device))
        ahf.append(batch["ahf"].to(accelerator.device))
        index.append(batch["sample_index"].to(accelerator.device))
        padding.append(batch["is_padding"].to(accelerator.device))
        failed.append(batch["decode_failed"].to(accelerator.device))
        file_ids.extend(batch["file_id"])
        metadata.extend(batch.get("metadata") or [{} for _ in batch["file_id"]])
        patients.extend(batch.get("patient_id") or [None for _ in batch["file_id"]])
        if should_stop is not None and should_stop(len(logits)):
            raise StopRequested
    if not logits:  # an empty split: every rank has zero steps
        empty = np.zeros((0,))
        return SplitPredictions([], np.zeros((0, 6, 5)), np.zeros((0, 6), dtype=np.int64), empty, empty,
                                float("nan"), 0, zone_logits=np.zeros((0, 6, 5), dtype=np.float32))
    # every rank ran the same number of equal batches, so a plain tensor gather is safe
    gathered = {name: accelerator.gather(torch.cat(parts)).cpu() for name, parts in
                (("logits", logits), ("targets", targets), ("csi", csi), ("ahf", ahf), ("index", index),
                 ("padding", padding), ("failed", failed))}
    # the metadata travels with its sample like the file ids (not looked up afterwards by FileID): what was
    # predicted is what is described, with no second read of the shards
    gathered_objects = [item for part in _gather_objects(accelerator, list(zip(file_ids, metadata, patients)))
                        for item in part]
    all_file_ids = [file_id for file_id, _, _ in gathered_objects]
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    weight_sum = accelerator.reduce(weight_sum, reduction="sum")
    keep = ~(gathered["padding"] | gathered["failed"])
    order = torch.argsort(gathered["index"][keep])
    kept_ids = [file_id for file_id, flag in zip(all_file_ids, keep.tolist()) if flag]
    kept_metadata = [sample for (_, sample, _), flag in zip(gathered_objects, keep.tolist()) if flag]
    kept_patients = [patient for (_, _, patient), flag in zip(gathered_objects, keep.tolist()) if flag]
    ordered_metadata = [kept_metadata[i] for i in order.tolist()]
    columns = list(dict.fromkeys(name for sample in ordered_metadata for name in sample))
    kept_logits = gathered["logits"][keep][order]
    return SplitPredictions(
        file_ids=[kept_ids[i] for i in order.tolist()],
        # float64: the argmax of the probabilities is the argmax of the logits, raw or temperature-scaled
        zone_probs=kept_logits.double().softmax(dim=-1).numpy(),
        zone_targets=gathered["targets"][keep][order].numpy(),
        csi_truth=gathered["csi"][keep][order].numpy(),
        ahf_truth=gathered["ahf"][keep][order].numpy(),
        loss=float(loss_sum / weight_sum.clamp_min(1e-12)),
        decode_failures=int((gathered["failed"] & ~gathered["padding"]).sum()),  # padding copies not counted
        metadata={name: [sample.get(name) for sample in ordered_metadata] for name in columns},
        patient_ids=[kept_patients[i] for i in order.tolist()],
        zone_logits=kept_logits.numpy(),
    )


def _gather_objects(accelerator, local: list) -> list[list]:
    """Per-rank lists in rank order (torch.distributed.all_gather_object keeps ranks apart)."""
    if accelerator.num_processes == 1:
        return [local]
    gathered: list[list | None] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, local)
    return gathered
