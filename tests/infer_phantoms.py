"""Builders shared by the infer / predictor / click-file tests. No tests live here.

* Volumes with known geometry (ijk arrays + spacing, origin, direction in LPS), written as NIfTI/NRRD.
* Injected models whose output is known, to check geometry to the voxel:
  `SphereModel` predicts a ball of radius `radius` crop voxels around the newest click;
  `IntensityModel` predicts "z-normalised crop intensity > 0" (segments a bright phantom whatever the
  clicks) — big enough phantoms exercise crop extension.
* A small real checkpoint (fastsam3d-tiny, seeded random weights) for the end-to-end model path.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from fastsam3d_cli.imaging.volumes import affine_lps, image_from_array_ijk

CLI_ENV = {"NO_COLOR": "1", "COLUMNS": "200", "FASTSAM3D_OFFLINE": "1"}
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RAS_STORED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # i → R, j → A, k → S (like the real CT)
# Spacings chosen so that no input voxel centre falls exactly between two 1.5 mm voxels (no rounding ties).
TIE_FREE_SPACING = (1.1, 0.9, 2.3)


def rotation(axis: Sequence[float], degrees: float) -> tuple[float, ...]:
    """Row-major 3×3 rotation (Rodrigues) — an oblique direction matrix."""
    a = np.asarray(axis, dtype=np.float64)
    a /= np.linalg.norm(a)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    r = np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)
    return tuple(float(v) for v in r.ravel())


def make_image(array_ijk: np.ndarray, spacing: Sequence[float] = (1.5, 1.5, 1.5),
               origin: Sequence[float] = (0.0, 0.0, 0.0), direction: Sequence[float] = IDENTITY) -> sitk.Image:
    image = image_from_array_ijk(np.asarray(array_ijk))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in direction])
    return image


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def voxel_centres_lps(image: sitk.Image) -> np.ndarray:
    """(X, Y, Z, 3) LPS position of every voxel centre, ijk order."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.GetSize()], indexing="ij"), axis=-1).astype(np.float64)
    affine = affine_lps(image)
    return grid @ affine[:3, :3].T + affine[:3, 3]


def ellipsoid(image: sitk.Image, centre_lps: Sequence[float], semi_axes_mm: Sequence[float]) -> np.ndarray:
    """Boolean ijk mask of an axis-aligned (in LPS) ellipsoid, evaluated at voxel centres."""
    p = (voxel_centres_lps(image) - np.asarray(centre_lps)) / np.asarray(semi_axes_mm)
    return (p ** 2).sum(axis=-1) <= 1.0


def phantom(shape: Sequence[int] = (48, 40, 32), spacing: Sequence[float] = (2.0, 2.0, 3.0),
            origin: Sequence[float] = (10.0, -20.0, 30.0), direction: Sequence[float] = RAS_STORED,
            dtype: Any = np.int16, centre_lps: Sequence[float] | None = None,
            semi_axes_mm: Sequence[float] = (20.0, 16.0, 18.0)) -> tuple[sitk.Image, np.ndarray]:
    """A bright ellipsoid (200) in a dim body (20) with air (0) at the borders; returns (image, object mask)."""
    blank = make_image(np.zeros(shape, dtype=dtype), spacing, origin, direction)
    centres = voxel_centres_lps(blank)
    if centre_lps is None:
        centre_lps = centres[tuple(n // 2 for n in shape)]
    inside = ellipsoid(blank, centre_lps, semi_axes_mm)
    array = np.zeros(shape, dtype=np.float64)
    array[2:-2, 2:-2, 2:-2] = 20
    array[inside] = 200
    return make_image(array.astype(dtype), spacing, origin, direction), inside


def write_clicks(path: Path, space: str, objects: Sequence[dict[str, Any]], **extra: Any) -> Path:
    path.write_text(json.dumps({"version": 1, "space": space, "objects": list(objects), **extra}))
    return path


# ------------------------------------------------------------------------------------------ fake models
class _FakeModel:
    """Records every call; `decode` stashes the full-resolution logits that `upsample_logits` returns."""

    def __init__(self) -> None:
        self.encoded: list[np.ndarray] = []  # z-normalised crops given to encode
        self.decode_calls: list[dict[str, Any]] = []
        self._full: torch.Tensor | None = None

    def parameters(self):  # noqa: D401 - mimic nn.Module for device detection
        return iter([torch.zeros(1)])

    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        assert tuple(volume.shape) == (1, 1, 128, 128, 128)
        self.encoded.append(volume[0, 0].numpy().copy())
        return volume.clone()

    def decode(self, embedding, points, point_labels, mask_logits):
        self.decode_calls.append({"points": points.clone(), "labels": point_labels.clone(),
                                  "mask": None if mask_logits is None else mask_logits.clone()})
        self._full = self.full_logits(embedding, points, point_labels)
        return F.avg_pool3d(self._full, 4), torch.ones(1, 1)

    def upsample_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        assert tuple(low_res.shape) == (1, 1, 32, 32, 32)
        return self._full

    def full_logits(self, embedding, points, point_labels) -> torch.Tensor:
        raise NotImplementedError


class SphereModel(_FakeModel):
    """Logit = radius − distance (crop voxels) to the newest click: a ball around it, exactly placed."""

    def __init__(self, radius: float = 10.0) -> None:
        super().__init__()
        self.radius = radius

    def full_logits(self, embedding, points, point_labels) -> torch.Tensor:
        grid = torch.stack(torch.meshgrid(*[torch.arange(128, dtype=torch.float64)] * 3, indexing="ij"), dim=-1)
        distance = torch.linalg.norm(grid - points[0, -1].double(), dim=-1)
        return (self.radius - distance).float()[None, None]


class IntensityModel(_FakeModel):
    """Logit = the z-normalised crop itself: segments whatever is brighter than the crop's mean foreground."""

    def full_logits(self, embedding, points, point_labels) -> torch.Tensor:
        return embedding.clone()


# ------------------------------------------------------------------------------------------ real model
def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A real fastsam3d-tiny checkpoint file with seeded random weights (what `fastsam3d distill` would save)."""
    from fastsam3d_cli.model import build_model
    from fastsam3d_cli.model.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = build_model("fastsam3d-tiny")
    save_checkpoint(path, model.state_dict(), config=model.config.to_dict())
    return path


def expected_nearest_paste(image: sitk.Image, canonical: sitk.Image, crop_start: Sequence[int],
                           inside_crop) -> tuple[np.ndarray, np.ndarray]:
    """Independent numpy model of "paste back nearest": for every input voxel, the canonical voxel nearest to
    its centre; returns (expected bool mask, ambiguous voxels whose centre is within 1e-6 of a rounding tie).

    inside_crop(crop_index (…, 3) int) → bool: the crop-space prediction.
    """
    affine = affine_lps(canonical)
    index = (voxel_centres_lps(image) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    nearest = np.floor(index + 0.5).astype(int)
    in_grid = np.all((nearest >= 0) & (nearest < np.asarray(canonical.GetSize())), axis=-1)
    crop = nearest - np.asarray(crop_start)
    in_crop = np.all((crop >= 0) & (crop < 128), axis=-1)
    expected = in_grid & in_crop & inside_crop(crop)
    fraction = index - np.floor(index)
    ambiguous = np.any(np.abs(fraction - 0.5) < 1e-6, axis=-1)
    return expected, ambiguous


def one_line_error(result, code: int, *fragments: str) -> str:
    """Assert a CLI result is exit `code` with exactly one `fastsam3d: error:` line holding `fragments`; return it."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fastsam3d: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
