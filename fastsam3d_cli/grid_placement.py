"""Where to put the output grid so that nearest-neighbour resampling keeps a small label's volume.

Resampling a label at 1 mm onto a 1.5 mm grid by nearest neighbour picks two of every three source
planes along each axis. Which two depends on where the grid sits: a sub-voxel shift of the grid is an
equally valid 1.5 mm resampling (the NIfTI header records where the grid is), but it changes which
source voxels are sampled. For a large structure the choice does not matter; a thin region of a few mL
gains or loses several percent depending on it (Colin27 + AAL: 83 of 116 regions within ±2% on the
grid that keeps the physical extent, 94 on the best single grid, every region on some grid).

`prepare` therefore keeps the case's common grid for every class whose volume it keeps within
`VOLUME_TOLERANCE`, and gives any other class a nearby placement (one of 26 shifts by a third of a
voxel) whose nearest-neighbour sampling keeps it within the tolerance, or comes closest; the classes of a
case share as few placements as possible, since each costs one more image on disk. Labels stay
nearest-neighbour samples of the source; only the grid's position changes, and image and label of the
class share it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli.imaging import resample_onto

VOLUME_TOLERANCE = 0.01  # a class whose volume the common grid changes by more than this gets its own grid
BOX_MARGIN = 2  # output voxels around a class's bounding box when counting it on a shifted grid

Shift = tuple[float, float, float]  # mm along the grid's own i, j, k axes
Grid = tuple[Sequence[int], Sequence[float], Sequence[float], Sequence[float]]  # size, spacing, origin, direction


def grid_of(image: sitk.Image) -> Grid:
    """(size, spacing, origin, direction) of an image."""
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def placement_shifts(source_spacing: Sequence[float], target_spacing: Sequence[float]) -> list[Shift]:
    """The 26 shifts tried: −d, 0 or +d on each axis (not all 0), d = a third of the finer of the two spacings.

    A third of a voxel reaches every distinct nearest-neighbour sampling pattern of a 2:3 ratio (1 → 1.5 mm)
    and stays within half a source voxel of the common grid. Nearest shifts first (a tie keeps the nearer).
    """
    steps = [min(float(s), float(t)) / 3.0 for s, t in zip(source_spacing, target_spacing)]
    shifts = [tuple(sign * step for sign, step in zip(signs, steps))
              for signs in itertools.product((0, -1, 1), repeat=3) if any(signs)]
    return sorted(shifts, key=lambda s: (sum(abs(v) > 0 for v in s), float(np.linalg.norm(s))))  # type: ignore[misc]


def shifted_grid(grid: Grid, shift: Shift, start: Sequence[int] = (0, 0, 0), size: Sequence[int] | None = None) -> Grid:
    """The grid moved by `shift` (mm, along its own axes), optionally cut to `size` voxels from index `start`."""
    full_size, spacing, origin, direction = grid
    axes = np.asarray(direction, dtype=float).reshape(3, 3)
    offset = np.asarray(spacing, dtype=float) * np.asarray(start, dtype=float) + np.asarray(shift, dtype=float)
    moved = np.asarray(origin, dtype=float) + axes @ offset
    return (list(size if size is not None else full_size), tuple(spacing), tuple(float(o) for o in moved),
            tuple(direction))


def resample_on_grid(image: sitk.Image, grid: Grid, interpolation: str) -> sitk.Image:
    """Resample onto `grid`; samples that a shift pushed just past the volume's edge take the nearest voxel."""
    size, spacing, origin, direction = grid
    return resample_onto(image, size=size, spacing=spacing, origin=origin, direction=direction,
                         interpolation=interpolation, extrapolate=True)  # type: ignore[arg-type]


def bounding_box(mask_ijk: np.ndarray, margin: int = BOX_MARGIN) -> tuple[list[int], list[int]]:
    """[start, stop) per axis of the non-zero voxels of an ijk mask, widened by `margin` and clipped."""
    start, stop = [], []
    for axis in range(3):
        present = np.flatnonzero(mask_ijk.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(max(int(present[0]) - margin, 0))
        stop.append(min(int(present[-1]) + 1 + margin, mask_ijk.shape[axis]))
    return start, stop


def shift_counts(label: sitk.Image, grid: Grid, box: tuple[list[int], list[int]], values: Sequence[int],
                 shifts: Sequence[Shift]) -> dict[Shift, int]:
    """Voxels of `values` that nearest-neighbour sampling puts on the common grid moved by each shift.

    Only the class's bounding box (on the common grid, with a margin) is resampled for each shift.
    """
    start, stop = box
    size = [b - a for a, b in zip(start, stop)]
    counts = {}
    for shift in shifts:
        piece = resample_on_grid(label, shifted_grid(grid, shift, start, size), "nearest")
        array = sitk.GetArrayViewFromImage(piece)
        counts[shift] = int(np.count_nonzero(array == values[0] if len(values) == 1 else np.isin(array, values)))
    return counts


@dataclass(frozen=True)
class PlacementNeed:
    """A class the common grid does not keep within tolerance: its expected and current voxel counts, and
    the count each shift would give."""

    expected: float
    current: int
    counts: dict[Shift, int]


def assign_shifts(needs: dict[str, PlacementNeed], shifts: Sequence[Shift],
                  tolerance: float = VOLUME_TOLERANCE) -> dict[str, Shift]:
    """Which shift each class gets (a class left out stays on the common grid), with few distinct shifts.

    Every extra shift costs one more resampled image on disk, so shifts are picked greedily: the one that
    brings the most remaining classes within `tolerance` (the nearer on a tie), until none brings any. A
    class no shift brings within tolerance takes the shift that comes closest, an already chosen one on a
    tie, and only if it does better than the common grid.
    """
    def error(name: str, shift: Shift) -> float:
        return abs(needs[name].counts[shift] - needs[name].expected)

    chosen: dict[str, Shift] = {}
    remaining = set(needs)
    while remaining:
        covered = {shift: {n for n in remaining if error(n, shift) <= tolerance * needs[n].expected}
                   for shift in shifts}
        best = max(shifts, key=lambda shift: len(covered[shift]))  # max keeps the first (nearest) on a tie
        if not covered[best]:
            break
        chosen.update({name: best for name in covered[best]})
        remaining -= covered[best]
    in_use = set(chosen.values())
    for name in sorted(remaining):
        closest = min(shifts, key=lambda shift: (error(name, shift), shift not in in_use))
        if error(name, closest) < abs(needs[name].current - needs[name].expected):
            chosen[name] = closest
            in_use.add(closest)
    return chosen
