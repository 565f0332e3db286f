"""`grid_placement`: the candidate shifts, the moved grids, and which class gets which placement."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fastsam3d_cli.grid_placement import (PlacementNeed, assign_shifts, bounding_box, placement_shifts, shift_counts,
                                          shifted_grid)


def test_26_shifts_of_a_third_of_the_finer_spacing_nearest_first():
    shifts = placement_shifts((1.0, 0.8, 3.0), (1.5, 1.5, 1.5))
    assert len(shifts) == 26 and len(set(shifts)) == 26 and (0.0, 0.0, 0.0) not in shifts
    steps = (1.0 / 3, 0.8 / 3, 1.5 / 3)  # min(source, target) / 3 per axis
    for shift in shifts:
        assert all(v == 0 or v == pytest.approx(step) or v == pytest.approx(-step) for v, step in zip(shift, steps))
    moved_axes = [sum(v != 0 for v in s) for s in shifts]
    assert moved_axes == sorted(moved_axes) and moved_axes[:6] == [1] * 6  # one-axis moves first


def test_shifted_grid_moves_along_the_grids_own_axes():
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS-stored
    grid = ((10, 8, 6), (1.5, 1.5, 1.5), (10.0, -20.0, 30.0), direction)
    size, spacing, origin, moved_direction = shifted_grid(grid, (0.5, 0.0, -0.25), start=(2, 0, 1), size=(3, 3, 3))
    assert list(size) == [3, 3, 3] and spacing == (1.5, 1.5, 1.5) and moved_direction == direction
    assert origin == pytest.approx((10.0 - (2 * 1.5 + 0.5), -20.0, 30.0 + 1.5 - 0.25))


def test_bounding_box_with_margin_is_clipped():
    mask = np.zeros((10, 8, 6), np.uint8)
    mask[1:3, 4:6, 5] = 1
    assert bounding_box(mask, margin=2) == ([0, 2, 3], [5, 8, 6])


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


def test_one_placement_for_every_class_it_keeps_within_tolerance():
    needs = {"x": PlacementNeed(100.0, 110, {A: 100, B: 101, C: 130}),   # B is closer for nobody but y
             "y": PlacementNeed(100.0, 90, {A: 100, B: 100, C: 80}),
             "z": PlacementNeed(200.0, 220, {A: 150, B: 201, C: 200})}
    # A covers x and y, B covers x, y and z: B alone serves all three.
    assert assign_shifts(needs, [A, B, C], tolerance=0.01) == {"x": B, "y": B, "z": B}


def test_greedy_cover_then_closest_or_stay():
    needs = {"x": PlacementNeed(100.0, 110, {A: 100, B: 120, C: 120}),
             "y": PlacementNeed(100.0, 110, {A: 95, B: 95, C: 120}),    # nobody within 1%: A ties B, A in use
             "z": PlacementNeed(100.0, 102, {A: 90, B: 110, C: 103})}  # nothing beats the common grid: stays
    assert assign_shifts(needs, [A, B, C], tolerance=0.01) == {"x": A, "y": A}
