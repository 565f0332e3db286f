"""Segmentation loss and overlap metrics for binary masks given as logits (no MONAI dependency).

`dice_ce_loss` is the training loss of SAM-Med3D / FastSAM3D (reference/models.md §5.1): MONAI's
`DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")` on the 128³ upsampled logits, i.e.

    dice = 1 − (2·Σ p·g + 1e-5) / (Σ p² + Σ g² + 1e-5)      p = sigmoid(logits), per sample, averaged over the batch
    ce   = mean binary cross-entropy of the logits             (numerically stable form)
    loss = dice + ce

An optional `weight` mask (1 = counts, 0 = nnU-Net "ignore" voxel) removes voxels from both terms.

`correction_loss` is the loss of a model that corrects a prior (`train --prior classical --prior-loss
correction`): it pays for the prior's wrong voxels and for right voxels the model makes worse, never for making
right voxels more confident (with Dice + CE, that reward taught the residual a constant offset, docs/models.md).
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


def correction_loss(logits: torch.Tensor, prior_logits: torch.Tensor, target: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of a model whose logits correct `prior_logits`: anchored soft Dice + one-sided cross-entropy.

    Per voxel, with z the logits, P the prior's and CE(x) the binary cross-entropy of logit x:
    - where the prior is wrong, CE(z), the full pull towards flipping it;
    - where the prior is right, max(0, CE(z) − CE(P)): a cost only for moving towards the wrong side, nothing
      for moving further from it — the model gains nothing by sharpening what the prior already gets right.
    The mean over the counted voxels is added to the squared soft Dice of the anchored probabilities
    clamp(1[P > 0] + σ(z) − σ(P), 0, 1): the prior's hard mask plus the model's change of probability (on right
    voxels only a change towards the wrong side). So the prior's haze of small probabilities (σ(−4) ≈ 0.018 on
    ~2 M background voxels) is not a soft false positive the model is rewarded for removing. With z = P the loss
    is the hard prior's Dice loss plus the CE of its wrong voxels. All shapes (B, ...) equal; float32 whatever
    the input dtype."""
    z, prior, target = logits.float(), prior_logits.float(), target.float()
    truth = target > 0.5
    prior_right = (prior > 0) == truth
    ce = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    prior_ce = F.binary_cross_entropy_with_logits(prior, target, reduction="none")
    per_voxel = torch.where(prior_right, F.relu(ce - prior_ce), ce)
    change = torch.sigmoid(z) - torch.sigmoid(prior)
    # on right voxels only a change towards the wrong side counts (relu: no gradient at no change either)
    change = torch.where(prior_right, torch.where(truth, -F.relu(-change), F.relu(change)), change)
    anchored = ((prior > 0).float() + change).clamp(0.0, 1.0)
    if weight is not None:
        weight = weight.float()
        per_voxel, anchored, target = per_voxel * weight, anchored * weight, target * weight
        ce_term = per_voxel.sum() / weight.sum().clamp_min(1.0)
    else:
        ce_term = per_voxel.mean()
    dims = tuple(range(1, z.ndim))
    intersection = (anchored * target).sum(dims)
    denominator = (anchored * anchored).sum(dims) + (target * target).sum(dims)
    dice = (1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)).mean()
    return dice + ce_term


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
