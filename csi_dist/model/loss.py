"""WeightedCSILoss: zone-wise cross-entropy with the unknown class down-weighted, ignoring padded samples."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from csi_dist.core.domain import NUM_CLASSES, UNKNOWN_CLASS


class WeightedCSILoss(nn.Module):
    """Cross-entropy over the 5 classes with class weights [1, 1, 1, 1, unknown_weight].

    The mean is weighted by each zone's class weight (as torch's weighted CE does), over the zones of real samples
    only: a batch row with `sample_mask` False (distributed padding or an undecodable image) contributes nothing.
    """

    def __init__(self, unknown_weight: float = 0.3):
        super().__init__()
        class_weights = torch.ones(NUM_CLASSES)
        class_weights[UNKNOWN_CLASS] = unknown_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def weighted_sum(self, zone_logits: torch.Tensor, zone_targets: torch.Tensor,
                     sample_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of class-weighted zone losses, sum of their weights): the two halves of the weighted mean.

        Distributed training divides the local sum by the global weight so that the DDP gradient equals the
        gradient of one process seeing the whole global batch.
        """
        logits = zone_logits.reshape(-1, NUM_CLASSES).float()
        per_zone = F.cross_entropy(logits, zone_targets.reshape(-1), reduction="none")
        weights = self.zone_weights(zone_targets, sample_mask)
        return (per_zone * weights).sum(), weights.sum()

    def zone_weights(self, zone_targets: torch.Tensor, sample_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each zone's weight in the mean (its class weight, 0 for a masked sample), flattened; needs no logits, so
        a trainer can know the normaliser of a whole accumulation window before its first forward pass."""
        weights = self.class_weights.to(zone_targets.device)[zone_targets.reshape(-1)]
        if sample_mask is not None:
            weights = weights * sample_mask.to(weights.dtype).repeat_interleave(zone_targets.shape[1])
        return weights

    def forward(self, zone_logits: torch.Tensor, zone_targets: torch.Tensor,
                sample_mask: torch.Tensor | None = None) -> torch.Tensor:
        loss_sum, weight_sum = self.weighted_sum(zone_logits, zone_targets, sample_mask)
        # clamp: a batch made only of padding gives 0 loss (and 0 gradient), not NaN
        return loss_sum / weight_sum.clamp_min(1e-12)
