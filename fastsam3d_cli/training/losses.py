"""Segmentation loss and overlap metrics for binary masks given as logits (no MONAI dependency).

`dice_ce_loss` is the training loss of SAM-Med3D / FastSAM3D (reference/models.md §5.1): MONAI's
`DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")` on the 128³ upsampled logits, i.e.

    dice = 1 − (2·Σ p·g + 1e-5) / (Σ p² + Σ g² + 1e-5)      p = sigmoid(logits), per sample, averaged over the batch
    ce   = mean binary cross-entropy of the logits             (numerically stable form)
    loss = dice + ce

An optional `weight` mask (1 = counts, 0 = nnU-Net "ignore" voxel) removes voxels from both terms.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SMOOTH = 1e-5  # MONAI's smooth_nr = smooth_dr default


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """1 − soft Dice with squared denominators, per sample (over all non-batch dims), averaged over the batch.

    logits, target, weight: (B, ...) with the same shape; computed in float32 whatever the input dtype.
    """
    probability = torch.sigmoid(logits.float())
    target = target.float()
    if weight is not None:
        probability = probability * weight
        target = target * weight
    dims = tuple(range(1, logits.ndim))
    intersection = (probability * target).sum(dims)
    denominator = (probability * probability).sum(dims) + (target * target).sum(dims)
    return (1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)).mean()


def binary_cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor,
                              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy of logits against a {0, 1} target, over the voxels with weight > 0."""
    logits, target = logits.float(), target.float()
    if weight is None:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="mean")
    weight = weight.float()
    per_voxel = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    return per_voxel.sum() / weight.sum().clamp_min(1.0)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice (squared) + binary cross-entropy, both on sigmoid(logits) — the SAM-Med3D training loss."""
    return soft_dice_loss(logits, target, weight) + binary_cross_entropy_loss(logits, target, weight)


def dice_score(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Dice 2|A∩B| / (|A|+|B|) of two binary masks (any shape); NaN when both are empty."""
    prediction, target = prediction.bool(), target.bool()
    if valid is not None:
        prediction, target = prediction & valid.bool(), target & valid.bool()
    total = int(prediction.sum()) + int(target.sum())
    if total == 0:
        return math.nan
    return 2.0 * int((prediction & target).sum()) / total


def iou_score(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Intersection over union |A∩B| / |A∪B| of two binary masks; NaN when both are empty."""
    prediction, target = prediction.bool(), target.bool()
    if valid is not None:
        prediction, target = prediction & valid.bool(), target & valid.bool()
    union = int((prediction | target).sum())
    if union == 0:
        return math.nan
    return int((prediction & target).sum()) / union
