"""Builders shared by the train/validate/clicks tests: tiny prepared folders of phantoms. No tests live here.

A prepared folder in `prepare`'s layout (`<class>/<modality>_<dataset>/{imagesTr,labelsTr}/<case>.nii.gz`,
1.5 mm, binary uint8 labels), written directly without a manifest (the layout-scanning path of
`prepared.py`). Each case is a 40³ volume of positive noise with two bright objects of known geometry:
class `ball` (a sphere) and class `egg` (an axis-aligned ellipsoid).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli.imaging.volumes import image_from_array_ijk

CLI_ENV = {"NO_COLOR": "1", "COLUMNS": "200"}
SHAPE = (40, 40, 40)
SPACING_MM = 1.5
ORIGIN = (-30.0, -30.0, -30.0)
# LPS-stored (ITK identity direction): canonicalisation to RAS flips axes 0 and 1.
DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def ellipsoid(shape: Sequence[int], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean ellipsoid (ijk voxel units) of the given centre and semi-axes."""
    grid = np.indices(shape, dtype=np.float64)
    distance = sum(((grid[a] - center[a]) / radii[a]) ** 2 for a in range(3))
    return distance <= 1.0


def phantom_case(seed: int, shape: Sequence[int] = SHAPE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(image int16, {"ball": mask, "egg": mask}) with objects placed by `seed` (each ≥ 1000 voxels)."""
    rng = np.random.default_rng(seed)
    ball = ellipsoid(shape, rng.uniform(13, 17, size=3), (8.0, 8.0, 8.0))
    egg = ellipsoid(shape, rng.uniform(24, 27, size=3), (11.0, 8.0, 7.0)) & ~ball
    image = rng.normal(100.0, 15.0, size=shape)
    image[ball] += 250.0
    image[egg] += 150.0
    return np.clip(image, 1, None).astype(np.int16), {"ball": ball, "egg": egg}


def write_volume(path: Path, array_ijk: np.ndarray, spacing: float = SPACING_MM) -> Path:
    image = image_from_array_ijk(np.asarray(array_ijk))
    image.SetSpacing([spacing] * 3)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def make_prepared(root: Path, cases: Sequence[str] = ("p0", "p1"), dataset: str = "CT_Dataset990_Phantom",
                  classes: Sequence[str] = ("ball", "egg"), seed: int = 0) -> Path:
    """A prepared folder with every case × class; returns `root`."""
    for index, case in enumerate(cases):
        image, labels = phantom_case(seed + index)
        for name in classes:
            folder = root / name / dataset
            write_volume(folder / "imagesTr" / f"{case}.nii.gz", image)
            write_volume(folder / "labelsTr" / f"{case}.nii.gz", labels[name].astype(np.uint8))
    return root


def add_empty_label(root: Path, case: str = "p0", class_name: str = "void", dataset: str = "CT_Dataset990_Phantom",
                    seed: int = 0) -> Path:
    """Add class `class_name` of `case` with an all-zero label (no manifest: nothing says it is empty)."""
    image, _ = phantom_case(seed)
    folder = root / class_name / dataset
    write_volume(folder / "imagesTr" / f"{case}.nii.gz", image)
    return write_volume(folder / "labelsTr" / f"{case}.nii.gz", np.zeros(SHAPE, dtype=np.uint8))


def tree(root: Path) -> dict[str, int]:
    """Every file under `root` (relative path → size), to prove that nothing was written or lost."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(Path(root).rglob("*")) if p.is_file()}
