"""Builders shared by the prepare/nnunet tests: tiny nnU-Net v1/v2 raw datasets made of phantoms.

Volumes are built in code with known geometry (ijk arrays, spacing, origin, direction) so every
expected voxel count, volume and physical position can be computed by hand. No tests live here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli.imaging.volumes import image_from_array_ijk

CLI_ENV = {"NO_COLOR": "1", "COLUMNS": "200"}
SHAPE = (20, 16, 12)  # ijk
SPACING = (3.0, 3.0, 3.0)
ORIGIN = (10.0, -20.0, 30.0)  # LPS mm
# A non-trivial direction: axis i points to -x (R), j to -y (A), k to +z — RAS-stored, like the real CT.
RAS_STORED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def write_volume(path: Path, array_ijk: np.ndarray, spacing: Sequence[float] = SPACING,
                 origin: Sequence[float] = ORIGIN, direction: Sequence[float] = RAS_STORED) -> Path:
    """Write an ijk-ordered array as a NIfTI with the given LPS geometry."""
    image = image_from_array_ijk(np.asarray(array_ijk))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def phantom_label(shape: Sequence[int] = SHAPE) -> np.ndarray:
    """Label 1: 4×4×4 box (64 voxels); label 2: 2×2×2 box (8); label 3: a single voxel; label 4 absent."""
    label = np.zeros(shape, dtype=np.uint8)
    label[2:6, 3:7, 2:6] = 1
    label[10:12, 8:10, 6:8] = 2
    label[15, 12, 9] = 3
    return label


def phantom_image(shape: Sequence[int] = SHAPE, dtype: Any = np.int16) -> np.ndarray:
    """A ramp along i (value = 100 + 8·i) so linear interpolation is checkable exactly."""
    i = np.arange(shape[0]).reshape(-1, 1, 1)
    return np.broadcast_to(100 + 8 * i, shape).astype(dtype)


V2_LABELS = {"background": 0, "liver": 1, "left kidney": 2, "tiny": 3, "absent organ": 4}
V1_LABELS = {"0": "background", "1": "liver", "2": "left kidney", "3": "tiny", "4": "absent organ"}


def make_v2_dataset(parent: Path, name: str = "Dataset900_Phantom", cases: Sequence[str] = ("case_a",),
                    labels: dict[str, Any] | None = None, label_arrays: dict[str, np.ndarray] | None = None,
                    channel_names: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                    write_cases: bool = True) -> Path:
    """An nnU-Net v2 raw dataset: imagesTr/CASE_0000.nii.gz (one per channel), labelsTr/CASE.nii.gz."""
    root = parent / name
    root.mkdir(parents=True, exist_ok=True)
    channel_names = channel_names or {"0": "CT"}
    meta = {"channel_names": channel_names, "labels": labels or V2_LABELS, "numTraining": len(cases),
            "file_ending": ".nii.gz", "name": name}
    meta.update(extra or {})
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    if write_cases:
        for case in cases:
            label = (label_arrays or {}).get(case, phantom_label())
            for channel in channel_names:
                write_volume(root / "imagesTr" / f"{case}_{int(channel):04d}.nii.gz",
                             phantom_image(label.shape) + 1000 * int(channel))
            write_volume(root / "labelsTr" / f"{case}.nii.gz", label)
    return root


def make_v1_task(parent: Path, name: str = "Task900_Phantom", cases: Sequence[str] = ("case_a",),
                 modality: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> Path:
    """An nnU-Net v1 task: `training` lists ./imagesTr/CASE.nii.gz while the file is CASE_0000.nii.gz."""
    root = parent / name
    root.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "tensorImageSize": "3D", "modality": modality or {"0": "MRI"},
            "labels": labels or V1_LABELS, "numTraining": len(cases), "numTest": 0,
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
            "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    for case in cases:
        write_volume(root / "imagesTr" / f"{case}_0000.nii.gz", phantom_image())
        write_volume(root / "labelsTr" / f"{case}.nii.gz", phantom_label())
    return root


def read_ijk(path: Path) -> tuple[np.ndarray, sitk.Image]:
    """(ijk array, image) of a written file."""
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), image


def all_files(folder: Path) -> dict[str, float]:
    """Relative path → mtime of every file under `folder` (to prove nothing was written or touched)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
