"""Where to put the output grid so that nearest-neighbour resampling keeps a small label's volume.

Resampling a label at 1 mm onto a 1.5 mm grid by nearest neighbour picks two of every three source
planes along each axis. Which two depends on where the grid sits: a sub-voxel shift of the grid is an
equally valid 1.5 mm resampling (the NIfTI header records where the grid is), but it changes which
source voxels are sampled. For a large structure the choice does not matter; a thin region of a few mL
gains or loses several percent depending on it (Colin27 + AAL: 83 of 116 regions within ±2% on the
grid that keeps the physical extent, 94 on the best single grid, every region on some grid).

`prepare` therefore keeps the case's common grid for every class whose volume it keeps within
`VOLUME_TOLERANCE`, and gives any other class a nearby placement (one of 26 shifts by a third of a
voxel, tried in a fixed order) whose nearest-neighbour sampling keeps it within the tolerance, or comes
closest. Classes that fit the same early placement share it (one more image on disk per placement). Labels stay
nearest-neighbour samples of the source; only the grid's position changes, and image and label of the
class share it.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli.imaging.volumes import resample_onto

VOLUME_TOLERANCE = 0.01  # a class whose volume the common grid changes by more than this gets its own grid
BOX_MARGIN = 2  # output voxels around a class's bounding box when counting it on a shifted grid

Shift = tuple[float, float, float]  # mm along the grid's own i, j, k axes
COMMON_GRID: Shift = (0.0, 0.0, 0.0)
Grid = tuple[Sequence[int], Sequence[float], Sequence[float], Sequence[float]]  # size, spacing, origin, direction


def grid_of(image: sitk.Image) -> Grid:
    """(size, spacing, origin, direction) of an image."""
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def placement_shifts(label: sitk.Image, grid: Grid) -> list[Shift]:
    """The 26 shifts tried, in a fixed order (fewest moved axes, then nearest): −d, 0 or +d along each axis of
    `grid` (not all 0), d = a third of the finer of the grid's spacing and the label's voxel extent along it.

    A third of a voxel reaches every distinct nearest-neighbour sampling pattern of a 2:3 ratio (1 → 1.5 mm)
    and stays within half a source voxel of the common grid. The label's extent along each grid axis is
    measured through both directions, so a label stored with permuted or oblique axes gets the right step.
    """
    grid_axes = np.asarray(grid[3], dtype=float).reshape(3, 3)  # columns: the grid's i, j, k directions
    label_axes = np.asarray(label.GetDirection(), dtype=float).reshape(3, 3)
    extent = np.abs(grid_axes.T @ label_axes) @ np.asarray(label.GetSpacing(), dtype=float)
    steps = np.minimum(extent, np.asarray(grid[1], dtype=float)) / 3.0
    shifts = [tuple(float(sign * step) for sign, step in zip(signs, steps))
              for signs in itertools.product((0, -1, 1), repeat=3) if any(signs)]
    return sorted(shifts, key=lambda s: (sum(v != 0 for v in s), float(np.linalg.norm(s)), s))  # type: ignore


def shifted_grid(grid: Grid, shift: Shift, start: Sequence[int] = (0, 0, 0), size: Sequence[int] | None = None) -> Grid:
    """The grid moved by `shift` (mm, along its own axes), optionally cut to `size` voxels from index `start`."""
    full_size, spacing, origin, direction = grid
    axes = np.asarray(direction, dtype=float).reshape(3, 3)
    offset = np.asarray(spacing, dtype=float) * np.asarray(start, dtype=float) + np.asarray(shift, dtype=float)
    moved = np.asarray(origin, dtype=float) + axes @ offset
    return (list(size if size is not None else full_size), tuple(spacing), tuple(float(o) for o in moved),
            tuple(direction))


def resample_on_grid(image: sitk.Image, grid: Grid, interpolation: str, extrapolate: bool = False) -> sitk.Image:
    """Resample onto `grid`. Outside the image: 0, or with `extrapolate` the nearest voxel (for intensity
    images, whose edge a shift may push a third of a voxel past; never for labels, which stay 0 there as on
    the common grid)."""
    size, spacing, origin, direction = grid
    return resample_onto(image, size=size, spacing=spacing, origin=origin, direction=direction,
                         interpolation=interpolation, extrapolate=extrapolate)  # type: ignore[arg-type]


def label_boxes(label: sitk.Image) -> dict[int, tuple[list[int], list[int]]]:
    """[start, stop) ijk bounding box of every non-zero value of an integer label image, in one pass."""
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.ComputePerimeterOff()
    statistics.ComputeFeretDiameterOff()
    statistics.ComputeOrientedBoundingBoxOff()
    statistics.Execute(label)
    boxes = {}
    for value in statistics.GetLabels():
        box = statistics.GetBoundingBox(value)  # (x, y, z, size_x, size_y, size_z)
        boxes[int(value)] = ([int(v) for v in box[:3]], [int(a + n) for a, n in zip(box[:3], box[3:])])
    return boxes


def box_on_grid(label: sitk.Image, source_box: tuple[list[int], list[int]], grid: Grid,
                margin: int = BOX_MARGIN) -> tuple[list[int], list[int]]:
    """The [start, stop) box of `grid` voxels that covers a box of label voxels (their full extent, by
    physical position), widened by `margin` voxels and clipped to the grid. Every grid point whose nearest
    label voxel lies in the source box, on the grid or on it moved by less than a voxel, is inside."""
    size, spacing, origin, direction = grid
    to_index = np.linalg.inv(np.asarray(direction, dtype=float).reshape(3, 3) * np.asarray(spacing, dtype=float))
    low, high = source_box
    corners = [label.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
               for corner in itertools.product(*[(a - 0.5, b - 0.5) for a, b in zip(low, high)])]
    indices = (np.asarray(corners) - np.asarray(origin, dtype=float)) @ to_index.T
    start = np.maximum(np.floor(indices.min(axis=0)).astype(int) - margin, 0)
    stop = np.minimum(np.ceil(indices.max(axis=0)).astype(int) + 1 + margin, np.asarray(size))
    return [int(v) for v in start], [int(v) for v in np.maximum(stop, start)]


def union_box(boxes: Sequence[tuple[list[int], list[int]]]) -> tuple[list[int], list[int]]:
    """The smallest [start, stop) box holding all `boxes`."""
    return ([min(b[0][axis] for b in boxes) for axis in range(3)],
            [max(b[1][axis] for b in boxes) for axis in range(3)])


def shift_counts(label: sitk.Image, grid: Grid, box: tuple[list[int], list[int]], values: Sequence[int],
                 shifts: Sequence[Shift]) -> dict[Shift, int]:
    """Voxels of `values` that nearest-neighbour sampling puts on the grid moved by each shift, counted in
    `box` (which must cover the class: see `box_on_grid`)."""
    start, stop = box
    size = [b - a for a, b in zip(start, stop)]
    if min(size) <= 0:
        return {shift: 0 for shift in shifts}
    counts = {}
    for shift in shifts:
        piece = resample_on_grid(label, shifted_grid(grid, shift, start, size), "nearest")
        array = sitk.GetArrayViewFromImage(piece)
        counts[shift] = int(np.count_nonzero(array == values[0] if len(values) == 1 else np.isin(array, values)))
    return counts


def choose_shift(expected: float, current: int, counts: dict[Shift, int], shifts: Sequence[Shift],
                 tolerance: float = VOLUME_TOLERANCE) -> Shift | None:
    """The shift to write a class on, or None to keep the common grid.

    The first shift in `shifts`' fixed order that keeps the volume within `tolerance`; else the one that
    comes closest, if it does better than the common grid (or the common grid loses the class entirely).
    A shift that loses the class is never chosen. The choice depends on this class alone, so it is the same
    whichever classes a run prepares (`--classes`, a resumed run); classes still share placements because
    they take the first good one in the same order.
    """
    usable = [shift for shift in shifts if counts[shift] > 0]
    within = [shift for shift in usable if abs(counts[shift] - expected) <= tolerance * expected]
    if within:
        return within[0]
    if not usable:
        return None
    closest = min(usable, key=lambda shift: abs(counts[shift] - expected))  # the first on a tie
    return closest if current == 0 or abs(counts[closest] - expected) < abs(current - expected) else None
