"""Dice + CE loss (MONAI DiceCELoss(sigmoid, squared_pred) rewritten) and the Dice/IoU metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastsam3d_cli.training.losses import (SMOOTH, binary_cross_entropy_loss, correction_loss, dice_ce_loss,
                                          dice_score, iou_score, soft_dice_loss)


def _reference(logits: np.ndarray, target: np.ndarray) -> float:
    """The formula written out in numpy, per sample then averaged: 1 − (2Σpg+ε)/(Σp²+Σg²+ε) + mean BCE."""
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    dice = []
    for b in range(logits.shape[0]):
        pb, gb = p[b].ravel(), target[b].ravel().astype(np.float64)
        dice.append(1.0 - (2.0 * (pb * gb).sum() + SMOOTH) / ((pb ** 2).sum() + (gb ** 2).sum() + SMOOTH))
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p)).mean()
    return float(np.mean(dice) + bce)


def test_matches_the_written_out_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(3, 1, 6, 5, 4)).astype(np.float32)
    target = (rng.random((3, 1, 6, 5, 4)) > 0.6).astype(np.float32)
    loss = dice_ce_loss(torch.from_numpy(logits), torch.from_numpy(target))
    assert float(loss) == pytest.approx(_reference(logits, target), rel=1e-5)


def test_perfect_and_inverted_predictions():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., 2:6, 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 30  # ±30 logits
    assert float(soft_dice_loss(perfect, target)) < 1e-6
    assert float(binary_cross_entropy_loss(perfect, target)) < 1e-6
    assert float(soft_dice_loss(-perfect, target)) == pytest.approx(1.0, abs=1e-6)
    assert float(dice_ce_loss(-perfect, target)) > 20.0  # CE of confident mistakes is large


def test_empty_target_and_empty_prediction_cost_nothing():
    target = torch.zeros(2, 1, 4, 4, 4)
    assert float(soft_dice_loss(torch.full_like(target, -40.0), target)) == pytest.approx(0.0, abs=1e-6)


def test_weight_removes_ignored_voxels_from_both_terms():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(2, 1, 5, 5, 5)).astype(np.float32))
    target = torch.from_numpy((rng.random((2, 1, 5, 5, 5)) > 0.5).astype(np.float32))
    weight = torch.ones_like(target)
    weight[..., :2, :, :] = 0
    changed = logits.clone()
    changed[..., :2, :, :] = 100.0  # anything in ignored voxels
    assert float(dice_ce_loss(changed, target, weight)) == pytest.approx(float(dice_ce_loss(logits, target, weight)),
                                                                         rel=1e-6)
    # and equals the loss computed on the annotated voxels only
    inside = (slice(None), slice(None), slice(2, None))
    expected = _reference(logits[inside].numpy(), target[inside].numpy())
    assert float(dice_ce_loss(logits, target, weight)) == pytest.approx(expected, rel=1e-5)


def test_gradients_flow_and_half_precision_inputs_are_computed_in_float32():
    logits = torch.zeros(1, 1, 4, 4, 4, requires_grad=True)
    target = torch.ones(1, 1, 4, 4, 4)
    loss = dice_ce_loss(logits.half(), target)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.all(logits.grad < 0)  # raising the logits towards the all-ones target lowers the loss


def test_dice_and_iou_of_known_masks():
    a = torch.zeros(10, 10, 10, dtype=torch.bool)
    b = torch.zeros(10, 10, 10, dtype=torch.bool)
    a[0:4] = True  # 400 voxels
    b[2:6] = True  # 400 voxels, 200 shared
    assert dice_score(a, b) == pytest.approx(0.5)
    assert iou_score(a, b) == pytest.approx(200 / 600)
    assert math.isnan(dice_score(torch.zeros_like(a), torch.zeros_like(b)))
    assert math.isnan(iou_score(torch.zeros_like(a), torch.zeros_like(b)))
    assert dice_score(a, torch.zeros_like(b)) == 0.0
    valid = torch.ones_like(a)
    valid[0:2] = False  # ignoring a's unshared part: a∩valid = 200 voxels, all inside b
    assert dice_score(a, b, valid) == pytest.approx(2 * 200 / (200 + 400))


# ------------------------------------------------------------------------------ the correction loss
def _prior_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A target and ±4 prior logits that are right on about 80 % of the voxels."""
    generator = torch.Generator().manual_seed(seed)
    target = (torch.rand(2, 1, 6, 6, 6, generator=generator) > 0.7).float()
    sign = torch.where(torch.rand(2, 1, 6, 6, 6, generator=generator) > 0.2, 1.0, -1.0)
    return target, 4.0 * sign * (2 * target - 1)


def test_correction_loss_gives_nothing_for_sharpening_what_the_prior_gets_right():
    target, prior = _prior_case()
    right = (prior > 0) == (target > 0.5)
    sharper = prior + torch.where(right, 3.0 * torch.sign(prior), torch.zeros_like(prior))
    assert math.isclose(float(correction_loss(sharper, prior, target)), float(correction_loss(prior, prior, target)),
                        rel_tol=1e-6)
    # with Dice + CE the same sharpening lowers the loss: the reward the correction loss removes
    assert float(dice_ce_loss(sharper, target)) < float(dice_ce_loss(prior, target)) - 0.01


def test_correction_loss_rewards_fixing_wrong_voxels_and_charges_for_breaking_right_ones():
    target, prior = _prior_case(1)
    right = (prior > 0) == (target > 0.5)
    base = float(correction_loss(prior, prior, target))
    fixed = torch.where(right, prior, -prior)  # every wrong voxel flipped
    broken = torch.where(right, -prior, prior)  # every right voxel flipped
    assert float(correction_loss(fixed, prior, target)) < base - 0.5
    assert float(correction_loss(broken, prior, target)) > base + 0.5


def test_correction_loss_at_the_prior_is_the_hard_dice_loss_plus_the_wrong_voxels_ce():
    target, prior = _prior_case(2)
    hard = (prior > 0).float()
    dice = 1 - (2 * (hard * target).sum((1, 2, 3, 4)) + SMOOTH) / (hard.sum((1, 2, 3, 4)) + target.sum((1, 2, 3, 4)) + SMOOTH)
    wrong = (prior > 0) != (target > 0.5)
    ce = torch.nn.functional.softplus(torch.tensor(4.0)) * wrong.float().mean()
    assert math.isclose(float(correction_loss(prior, prior, target)), float(dice.mean() + ce), rel_tol=1e-5)


def test_correction_loss_gradients_push_wrong_voxels_towards_the_truth():
    target, prior = _prior_case(3)
    residual = torch.zeros_like(prior, requires_grad=True)
    correction_loss(prior + residual, prior, target).backward()
    wrong = (prior > 0) != (target > 0.5)
    towards_truth = -residual.grad * (2 * target - 1)  # gradient descent direction, in the truth's sign
    assert bool((towards_truth[wrong] > 0).all())
    right = ~wrong
    assert float(residual.grad[right].abs().max()) < 0.01 * float(residual.grad[wrong].abs().min())
