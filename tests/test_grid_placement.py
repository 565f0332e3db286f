"""`grid_placement`: the candidate shifts, the moved grids, and which class gets which placement."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fastsam3d_cli.data.grid_placement import (box_on_grid, choose_shift, label_boxes, placement_shifts, shift_counts,
                                          shifted_grid, union_box)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _label_image(array_ijk: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=IDENTITY, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def test_26_shifts_of_a_third_of_the_finer_spacing_nearest_first():
    label = _label_image(np.zeros((4, 4, 4), np.uint8), spacing=(1.0, 0.8, 3.0))
    shifts = placement_shifts(label, ((4, 4, 4), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), IDENTITY))
    assert len(shifts) == 26 and len(set(shifts)) == 26 and (0.0, 0.0, 0.0) not in shifts
    steps = (1.0 / 3, 0.8 / 3, 1.5 / 3)  # min(source, target) / 3 per axis
    for shift in shifts:
        assert all(v == 0 or v == pytest.approx(step) or v == pytest.approx(-step) for v, step in zip(shift, steps))
    moved_axes = [sum(v != 0 for v in s) for s in shifts]
    assert moved_axes == sorted(moved_axes) and moved_axes[:6] == [1] * 6  # one-axis moves first


def test_shift_steps_follow_a_label_stored_with_permuted_axes():
    """The label's i axis runs along the grid's k axis: the 3 mm spacing belongs to k, not to i."""
    permuted = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # label i → z, label k → x
    label = _label_image(np.zeros((4, 4, 4), np.uint8), spacing=(3.0, 1.0, 1.0), direction=permuted)
    shifts = placement_shifts(label, ((4, 4, 4), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), IDENTITY))
    assert sorted({round(abs(s[0]), 6) for s in shifts}) == [0.0, round(1 / 3, 6)]
    assert sorted({round(abs(s[2]), 6) for s in shifts}) == [0.0, 0.5]


def test_shifted_grid_moves_along_the_grids_own_axes():
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS-stored
    grid = ((10, 8, 6), (1.5, 1.5, 1.5), (10.0, -20.0, 30.0), direction)
    size, spacing, origin, moved_direction = shifted_grid(grid, (0.5, 0.0, -0.25), start=(2, 0, 1), size=(3, 3, 3))
    assert list(size) == [3, 3, 3] and spacing == (1.5, 1.5, 1.5) and moved_direction == direction
    assert origin == pytest.approx((10.0 - (2 * 1.5 + 0.5), -20.0, 30.0 + 1.5 - 0.25))


def test_boxes_cover_every_label_voxel_on_the_output_grid():
    """A class the 1.5 mm grid samples only in part (a thin sheet) is still inside its box, with a margin."""
    label = np.zeros((30, 20, 10), np.uint8)
    label[5:9, 4:8, 2:6] = 1
    label[20, 2:18, 1:9] = 1  # a one-voxel sheet far away
    label[12:14, 10:12, 3:5] = 2
    image = _label_image(label)
    boxes = label_boxes(image)
    assert boxes[1] == ([5, 2, 1], [21, 18, 9]) and boxes[2] == ([12, 10, 3], [14, 12, 5])
    assert union_box([boxes[1], boxes[2]]) == ([5, 2, 1], [21, 18, 9])
    grid = ((20, 14, 7), (1.5, 1.5, 1.5), (0.25, 0.25, 0.25), IDENTITY)
    start, stop = box_on_grid(image, boxes[1], grid, margin=2)
    # source voxels 5..20 span 4.5..20.5 mm → grid index (4.5-0.25)/1.5 = 2.83 .. 13.5 → [2-2, 14+1+2)
    assert (start[0], stop[0]) == (0, 17) and stop[2] == 7  # clipped to the grid


def test_shift_counts_are_nearest_neighbour_counts_on_the_moved_grid():
    """A 2-voxel-thick slab at 1 mm sampled by a 1.5 mm grid: 1 or 2 planes depending on where the grid sits."""
    label = np.zeros((30, 12, 12), np.uint8)
    label[10:12, 3:9, 3:9] = 1
    image = sitk.GetImageFromArray(label.transpose(2, 1, 0).copy())  # unit spacing, identity
    grid = ((20, 8, 8), (1.5, 1.5, 1.5), (0.25, 0.25, 0.25), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    box = ([4, 0, 0], [10, 8, 8])
    counts = shift_counts(image, grid, box, [1], [(0.0, 0.0, 0.0), (1 / 3, 0.0, 0.0), (-1 / 3, 0.0, 0.0)])
    # i planes sampled: 0.25+1.5k → {…, 11 (k=7)}: one plane; +1/3 → 9.58→10, 11.08→11: two; -1/3 → 10.42→10: one.
    j_count = sum(1 for k in range(8) if 3 <= int(np.floor(0.25 + 1.5 * k + 0.5)) < 9)
    assert counts == {(0.0, 0.0, 0.0): j_count ** 2, (1 / 3, 0.0, 0.0): 2 * j_count ** 2,
                      (-1 / 3, 0.0, 0.0): j_count ** 2}


A, B, C = (0.5, 0.0, 0.0), (0.0, 0.5, 0.0), (0.0, 0.0, 0.5)


def test_the_first_shift_in_order_that_keeps_the_volume_wins():
    # B and C keep 100 within 1%; B comes first in the order. The choice depends on this class alone.
    assert choose_shift(100.0, 110, {A: 120, B: 101, C: 100}, [A, B, C], tolerance=0.01) == B


def test_closest_only_when_better_never_an_empty_one():
    assert choose_shift(100.0, 110, {A: 95, B: 95, C: 120}, [A, B, C], tolerance=0.01) == A  # first on a tie
    assert choose_shift(100.0, 102, {A: 90, B: 110, C: 103}, [A, B, C], tolerance=0.01) is None  # common is best
    assert choose_shift(3.6, 8, {A: 0, B: 0, C: 0}, [A, B, C], tolerance=0.01) is None  # never lose the class
    assert choose_shift(3.6, 8, {A: 0, B: 4, C: 0}, [A, B, C], tolerance=0.01) == B  # |4-3.6| < |8-3.6|


def test_a_class_the_common_grid_loses_gets_a_placement_that_keeps_it():
    assert choose_shift(3.6, 0, {A: 0, B: 8, C: 0}, [A, B, C], tolerance=0.01) == B
