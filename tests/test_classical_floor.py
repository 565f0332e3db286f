"""The classical floor on phantoms of known geometry: region growing, the exclude cut, the growth bound,
anisotropic spacing, any grid orientation, and its bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fastsam3d_cli.errors import BadInputError, UsageError
from fastsam3d_cli.interactive.classical import ClassicalSegmenter, FloorParameters
from fastsam3d_cli.imaging.volumes import image_from_array_ijk
from fastsam3d_cli.training.evaluation import dice


def _balls(shape, spacing, centres_mm, radius_mm, values, background=20.0, noise=4.0, seed=0):
    """(image, [mask per ball]): bright balls (values) on a dim noisy background; spacing in mm."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), axis=-1)
    rng = np.random.default_rng(seed)
    array = np.full(shape, background, dtype=np.float64)
    masks = []
    for centre, value in zip(centres_mm, values):
        mask = ((grid - np.asarray(centre)) ** 2).sum(axis=-1) <= radius_mm ** 2
        array[mask] = value
        masks.append(mask)
    array += rng.normal(0.0, noise, shape)
    image = image_from_array_ijk(array.astype(np.float32))
    image.SetSpacing([float(s) for s in spacing])
    return image, masks


def _index(centre_mm, spacing):
    return tuple(int(round(c / s)) for c, s in zip(centre_mm, spacing))


SPACING = (1.0, 1.0, 2.0)
CENTRE_A, CENTRE_B = (28.0, 30.0, 30.0), (50.0, 30.0, 30.0)  # radius 12: the balls overlap (touch over a disc)


def test_one_include_click_fills_a_bright_ball():
    image, (ball,) = _balls((60, 60, 30), SPACING, [CENTRE_A], 12.0, [200.0])
    floor = ClassicalSegmenter()
    floor.set_volume(image)
    mask = floor.add_click(_index(CENTRE_A, SPACING), include=True)
    assert mask.shape == ball.shape and mask.dtype == bool
    assert dice(mask, ball) > 0.95


def test_exclude_click_splits_touching_balls_of_similar_intensity():
    image, (a, b) = _balls((80, 60, 30), SPACING, [CENTRE_A, CENTRE_B], 12.0, [200.0, 190.0])
    floor = ClassicalSegmenter(FloorParameters(reach_mm=40.0))  # B's far side is 34 mm from the click
    floor.set_volume(image)
    merged = floor.add_click(_index(CENTRE_A, SPACING), include=True, object="a")
    assert dice(merged, a | b) > 0.95  # one intensity, one connected region: both balls
    split = floor.add_click(_index(CENTRE_B, SPACING), include=False, object="a")
    assert dice(split, a) > 0.93
    assert split[b & ~a].sum() < 0.03 * b.sum()
    # the cut follows the geodesic midway: the contact plane x = 39 mm, to within the coarse cut step
    xs = np.nonzero(split.any(axis=(1, 2)))[0]
    assert 37 <= xs.max() <= 41


def test_growth_is_bounded_around_the_clicks():
    image, (bar,) = _balls((200, 20, 10), (1.0, 1.0, 1.0), [(100.0, 10.0, 5.0)], 1000.0, [200.0])  # all bright
    floor = ClassicalSegmenter(FloorParameters(reach_mm=30.0))
    floor.set_volume(image)
    mask = floor.add_click((100, 10, 5))
    xs = np.nonzero(mask.any(axis=(1, 2)))[0]
    assert xs.min() >= 100 - 31 and xs.max() <= 100 + 31
    assert mask[70:131].sum() > 0.9 * bar[70:131].sum()


def test_anisotropic_thick_slices_stay_in_millimetres():
    spacing = (0.78, 0.78, 6.5)  # brain MR-like
    image, (ball,) = _balls((96, 96, 12), spacing, [(37.0, 37.0, 39.0)], 15.0, [150.0], background=60.0)
    floor = ClassicalSegmenter()
    floor.set_volume(image)
    mask = floor.add_click(_index((37.0, 37.0, 39.0), spacing))
    assert dice(mask, ball) > 0.9


def test_same_mask_whatever_the_grid_orientation():
    image, (ball,) = _balls((50, 44, 20), SPACING, [(25.0, 22.0, 20.0)], 10.0, [180.0])
    array = sitk.GetArrayFromImage(image)[::-1, :, ::-1]  # (k, j, i): i and k reversed
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array))  # same physical voxels, other storage
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint((49, 0, 19)))
    floor = ClassicalSegmenter()
    floor.set_volume(image)
    reference = floor.add_click([-25.0, -22.0, 20.0], space="ras")
    floor.set_volume(flipped)
    other = floor.add_click([-25.0, -22.0, 20.0], space="ras")
    np.testing.assert_array_equal(other[::-1, :, ::-1], reference)


def test_objects_are_independent_and_reset():
    image, (a, b) = _balls((80, 60, 30), SPACING, [(20.0, 30.0, 30.0), (60.0, 30.0, 30.0)], 8.0, [200.0, 120.0])
    floor = ClassicalSegmenter()
    floor.set_volume(image)
    first = floor.add_click(_index((20.0, 30.0, 30.0), SPACING), object="a")
    second = floor.add_click(_index((60.0, 30.0, 30.0), SPACING), object="b")
    assert dice(first, a) > 0.9 and dice(second, b) > 0.9
    assert floor.objects == ["a", "b"]
    floor.reset_object("a")
    assert floor.objects == ["b"] and not floor.mask("a").any()


def test_exclude_only_object_is_empty():
    image, _ = _balls((30, 30, 10), SPACING, [(15.0, 15.0, 10.0)], 6.0, [200.0])
    floor = ClassicalSegmenter()
    floor.set_volume(image)
    assert not floor.add_click((15, 15, 5), include=False).any()


def test_bad_inputs():
    image, _ = _balls((30, 30, 10), SPACING, [(15.0, 15.0, 10.0)], 6.0, [200.0])
    floor = ClassicalSegmenter()
    with pytest.raises(UsageError, match="no volume set"):
        floor.add_click((1, 1, 1))
    floor.set_volume(image)
    with pytest.raises(BadInputError, match="outside the volume") as caught:
        floor.add_click((30, 1, 1))
    assert caught.value.exit_code == 3
    with pytest.raises(BadInputError, match="not a finite position"):
        floor.add_click((1.0, float("nan"), 1.0))
    with pytest.raises(UsageError, match="unknown click space"):
        floor.add_click((1, 1, 1), space="xyz")
    assert floor.objects == []  # a refused click is not kept
    with pytest.raises(BadInputError, match="3D scalar"):
        floor.set_volume(sitk.Image([4, 4], sitk.sitkFloat32))


def test_smoothing_follows_the_array_axes_on_an_anisotropic_grid():
    """Step 2 leaves alone an axis whose spacing exceeds 2σ — that axis, not its mirror in SimpleITK's order
    (a bug until 2026-12-04: on a (1.5, 1.5, 3.0) mm grid the first axis went unsmoothed, the third was)."""
    from fastsam3d_cli.interactive.classical import smoothed

    impulse = np.zeros((15, 15, 15), np.float32)
    impulse[7, 7, 7] = 1.0
    out = smoothed(impulse, np.array([1.5, 1.5, 3.0]), 1.0)
    assert out[7, 7, 6] == 0.0 and out[7, 7, 8] == 0.0  # the 3 mm axis: not smoothed
    assert out[6, 7, 7] > 0.0 and out[7, 6, 7] > 0.0  # the 1.5 mm axes: smoothed
    assert np.isclose(out.sum(), 1.0, atol=1e-3)
