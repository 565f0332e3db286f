#!/usr/bin/env python
"""How close can nearest-neighbour label resampling 1 mm → 1.5 mm get to each AAL region's volume?

    python benchmarks/colin27_nn_bound.py [--data DIR] [--steps 6] [--tolerance 0.02]

Issue 5 asks for every prepared class within 2% of its source volume, and for labels resampled
nearest-neighbour. For the 1 mm Colin27 + AAL atlas (116 regions, many of a few mL) no single 1.5 mm
grid does both, which is why `prepare` gives a class whose volume the common grid changes by more than
1% its own grid placement (`fastsam3d_cli.data.grid_placement`). This script shows the bound without the
tool: it places the 1.5 mm grid at every sub-voxel offset
on a `--steps`³ lattice over one 1.5 mm period (the offset is the only freedom nearest-neighbour
sampling at a fixed spacing has), samples the source labels nearest-neighbour, and counts the regions
whose volume stays within the tolerance. Along one axis a 1.5 mm grid picks two of every three 1 mm
planes, so there are only three distinct patterns per axis (27 in all), and the default 6 offsets per
axis already cover every one of them: the best count printed is the best nearest-neighbour can do. `fastsam3d prepare` keeps the physical extent (cell edges
aligned), which puts the first 1.5 mm sample 0.25 mm past the first 1 mm sample on each axis.

Exit status 0 always: it measures, it does not check.
"""
from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TARGET_MM = 1.5


def nearest_indices(size: int, offset_mm: float, spacing_mm: float = 1.0) -> np.ndarray:
    """Source indices picked along one axis by a 1.5 mm grid whose first sample sits at `offset_mm`."""
    positions = offset_mm + TARGET_MM * np.arange(int((size * spacing_mm - offset_mm) / TARGET_MM) + 1)
    indices = np.floor(positions / spacing_mm + 0.5).astype(np.int64)
    return indices[indices < size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = os.environ.get("FASTSAM3D_DATA_DIR",
                                  str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--steps", type=int, default=6, help="offsets per axis over one 1.5 mm period")
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args()

    label_file = next((args.data / "Task503_Colin27" / "labelsTr").glob("*.nii.gz"))
    image = sitk.ReadImage(str(label_file))
    spacing = image.GetSpacing()
    if not np.allclose(spacing, 1.0):
        raise SystemExit(f"expected a 1 mm atlas, got spacing {spacing}")
    labels = sitk.GetArrayFromImage(image).astype(np.int64)  # (z, y, x)
    source_counts = np.bincount(labels.ravel())
    regions = np.flatnonzero(source_counts)[1:]
    source_mm3 = source_counts[regions].astype(float)

    offsets = [TARGET_MM * k / args.steps for k in range(args.steps)]
    results = []
    for offset in itertools.product(offsets, repeat=3):
        picked = labels[np.ix_(*(nearest_indices(n, o) for n, o in zip(labels.shape, offset)))]
        counts = np.bincount(picked.ravel(), minlength=source_counts.size)[regions] * TARGET_MM ** 3
        errors = counts / source_mm3 - 1.0
        results.append((int((np.abs(errors) <= args.tolerance).sum()), float(np.abs(errors).max()), offset,
                        regions[np.abs(errors) > args.tolerance]))
    results.sort(key=lambda r: (-r[0], r[1]))

    always_outside = set(results[0][3].tolist())
    for result in results[1:]:
        always_outside &= set(result[3].tolist())
    edge_aligned = (TARGET_MM - spacing[0]) / 2.0
    prepare_like = next(r for r in results if np.allclose(r[2], edge_aligned))
    small = source_mm3 < 20000
    print(f"{label_file.name}: {regions.size} regions, {int(small.sum())} under 20 mL; "
          f"{len(results)} grid placements ({args.steps} offsets per axis), tolerance ±{args.tolerance:.0%}")
    print(f"  best placement {results[0][2]} mm: {results[0][0]}/{regions.size} regions within, "
          f"worst |error| {results[0][1]:.1%}")
    print(f"  worst placement {results[-1][2]} mm: {results[-1][0]}/{regions.size} regions within")
    print(f"  edge-aligned placement {prepare_like[2]} mm (what prepare does): {prepare_like[0]}/{regions.size} "
          f"regions within, worst |error| {prepare_like[1]:.1%}")
    print(f"  regions outside at every placement: {len(always_outside)} (each region fits at some placement, "
          f"no placement fits all)" if not always_outside else
          f"  regions outside at every placement: {len(always_outside)}")


if __name__ == "__main__":
    main()
