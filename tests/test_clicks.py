"""Click simulation (`fastsam3d_cli.training.clicks`): random and ritm clicks on masks of known geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsam3d_cli.training.clicks import (SimulatedClick, clicks_to_prompt, distance_inside, error_regions, random_click,
                                  ritm_click, simulate_click, validation_click_method)
from train_phantoms import ellipsoid

SHAPE = (32, 32, 32)


def ball(center, radius) -> torch.Tensor:
    return torch.from_numpy(ellipsoid(SHAPE, center, (radius,) * 3))


def test_error_regions_are_missed_target_and_leak():
    target = torch.zeros(SHAPE, dtype=torch.bool)
    target[4:10] = True
    prediction = torch.zeros(SHAPE, dtype=torch.bool)
    prediction[8:14] = True
    fn, fp = error_regions(prediction, target)
    assert torch.equal(fn.nonzero()[:, 0].unique(), torch.arange(4, 8))
    assert torch.equal(fp.nonzero()[:, 0].unique(), torch.arange(10, 14))


def test_random_click_lies_in_an_error_and_is_labelled_by_it():
    target, prediction = ball((12, 12, 12), 6), ball((18, 12, 12), 6)
    fn, fp = error_regions(prediction, target)
    rng = np.random.default_rng(0)
    labels = []
    for _ in range(300):
        click = random_click(prediction, target, rng)
        assert isinstance(click, SimulatedClick)
        in_fn, in_fp = bool(fn[click.position]), bool(fp[click.position])
        assert in_fn or in_fp
        assert click.label == int(in_fn)
        labels.append(click.label)
    # Uniform over FN ∪ FP: the share of include clicks follows |FN| / (|FN| + |FP|) (here 1/2 by symmetry).
    expected = int(fn.sum()) / int((fn | fp).sum())
    assert abs(np.mean(labels) - expected) < 0.1


def test_random_click_is_uniform_over_the_error_voxels():
    target = torch.zeros(SHAPE, dtype=torch.bool)
    target[0, 0, :4] = True  # 4 missed voxels, no prediction
    rng = np.random.default_rng(1)
    counts = {}
    for _ in range(800):
        click = random_click(torch.zeros_like(target), target, rng)
        counts[click.position] = counts.get(click.position, 0) + 1
    assert sorted(counts) == [(0, 0, k) for k in range(4)]
    assert all(150 < n < 250 for n in counts.values())


def test_clicks_are_reproducible_with_the_same_seed():
    target, prediction = ball((12, 12, 12), 6), ball((16, 14, 12), 5)
    for method in ("random", "ritm"):
        first = [simulate_click(method, prediction, target, np.random.default_rng(7)) for _ in range(3)]
        again = [simulate_click(method, prediction, target, np.random.default_rng(7)) for _ in range(3)]
        assert first == again
    draws = {random_click(prediction, target, np.random.default_rng(seed)).position for seed in range(10)}
    assert len(draws) > 1  # the seed matters


def test_ritm_clicks_the_core_of_the_deeper_error_region():
    target = ball((12, 16, 16), 8)  # fully missed: FN is a ball of radius 8
    prediction = torch.zeros(SHAPE, dtype=torch.bool)
    prediction[28:30, :, :] = True  # a thin leak (FP 2 voxels deep)
    rng = np.random.default_rng(3)
    for _ in range(50):
        click = ritm_click(prediction, target, rng)
        assert click.label == 1
        # distance > max/2 (max ≈ 8.5 voxels): within ~4.5 voxels of the centre, deep inside the ball
        assert np.linalg.norm(np.subtract(click.position, (12, 16, 16))) < 5.0
    # Now the leak is the deeper error: an exclude click inside it.
    leak = ball((20, 16, 16), 9)
    target = torch.zeros(SHAPE, dtype=torch.bool)
    target[2, 2, 2] = True
    click = ritm_click(leak, target, rng)  # FN: one voxel (depth 1); FP: a ball (depth ~9)
    assert click.label == 0 and bool(leak[click.position])
    assert np.linalg.norm(np.subtract(click.position, (20, 16, 16))) < 5.5


def test_distance_inside_counts_the_crop_border_as_outside():
    region = np.zeros((9, 9, 9), dtype=bool)
    region[0:5, :, :] = True  # a slab touching three borders
    distance = distance_inside(region)
    assert distance[2, 4, 4] == pytest.approx(3.0)  # 3 voxels from the open face at index 5
    assert distance[0, 4, 4] == pytest.approx(1.0)  # the border voxel: padded outside is 1 away
    assert distance[4, 0, 0] == pytest.approx(1.0)
    assert np.all(distance[5:] == 0)


def test_distance_inside_matches_scipy_edt():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(5)
    region = rng.random((20, 17, 13)) > 0.35
    expected = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1, 1:-1]
    np.testing.assert_allclose(distance_inside(region), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["random", "ritm"])
def test_empty_target_and_prediction_give_no_click_instead_of_crashing(method):
    empty = torch.zeros(SHAPE, dtype=torch.bool)
    assert simulate_click(method, empty, empty, np.random.default_rng(0)) is None


@pytest.mark.parametrize("method", ["random", "ritm"])
def test_empty_target_with_a_leak_gives_an_exclude_click(method):
    empty = torch.zeros(SHAPE, dtype=torch.bool)
    leak = ball((10, 10, 10), 4)
    click = simulate_click(method, leak, empty, np.random.default_rng(0))
    assert click.label == 0 and bool(leak[click.position])


@pytest.mark.parametrize("method", ["random", "ritm"])
def test_perfect_prediction_gives_a_confirming_include_click(method):
    target = ball((16, 16, 16), 6)
    click = simulate_click(method, target.clone(), target, np.random.default_rng(0))
    assert click.label == 1 and bool(target[click.position])
    if method == "ritm":
        assert np.linalg.norm(np.subtract(click.position, (16, 16, 16))) < 4.0


@pytest.mark.parametrize("method", ["random", "ritm"])
def test_clicks_avoid_ignored_voxels(method):
    target = ball((16, 16, 16), 8)
    valid = torch.ones(SHAPE, dtype=torch.bool)
    valid[:, :, :16] = False  # the left half is not annotated
    rng = np.random.default_rng(2)
    for _ in range(30):
        click = simulate_click(method, torch.zeros_like(target), target, rng, valid)
        assert click.position[2] >= 16 and click.label == 1


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown click method"):
        simulate_click("center", torch.zeros(SHAPE, dtype=torch.bool), ball((5, 5, 5), 2), np.random.default_rng(0))


def test_validation_protocol_and_prompt_tensors():
    assert [validation_click_method(k) for k in range(1, 5)] == ["ritm", "ritm", "random", "random"]
    points, labels = clicks_to_prompt([SimulatedClick((1, 2, 3), 1), None, SimulatedClick((4, 5, 6), 0)])
    assert points.shape == (3, 1, 3) and points.dtype == torch.float32
    assert points[:, 0].tolist() == [[1, 2, 3], [0, 0, 0], [4, 5, 6]]
    assert labels[:, 0].tolist() == [1, -1, 0]  # -1: the prompt encoder's "not a point"
