"""128³ model crops: where they sit in a volume, cutting them out (zero-padded), pasting them back, and the
intensity normalisation the models were trained with. Shared by infer, train, validate and distill.

All positions are voxel indices (ijk order) of the array the crop is taken from — the canonical 1.5 mm
volume. A crop may extend past the volume: the outside is zero in the crop and ignored when pasting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fastsam3d_cli.imaging import MODEL_SPACING_MM  # re-exported here; defined without numpy for the CLI

CROP_SIZE = 128  # voxels per side of the model input


@dataclass(frozen=True)
class CropBox:
    """A cube of `size` voxels starting at `start` (may be negative or run past the volume's end)."""

    start: tuple[int, int, int]
    size: int = CROP_SIZE

    @property
    def stop(self) -> tuple[int, int, int]:
        return tuple(s + self.size for s in self.start)  # type: ignore[return-value]

    @property
    def center(self) -> tuple[float, float, float]:
        """Centre in voxel-index coordinates (the middle between voxels size/2−1 and size/2)."""
        return tuple(s + (self.size - 1) / 2.0 for s in self.start)  # type: ignore[return-value]

    def contains(self, ijk: Sequence[float]) -> bool:
        """True when the voxel position lies inside the box (rounded to the nearest voxel)."""
        return all(lo <= round(float(p)) < lo + self.size for p, lo in zip(ijk, self.start))

    def to_crop(self, ijk: Sequence[float]) -> np.ndarray:
        """Volume voxel index → index inside the crop (float, same axis order)."""
        return np.asarray(ijk, dtype=np.float64) - np.asarray(self.start, dtype=np.float64)

    def shifted(self, offset: Sequence[int]) -> "CropBox":
        return CropBox(tuple(int(s + o) for s, o in zip(self.start, offset)), self.size)  # type: ignore[arg-type]

    def as_dict(self) -> dict:
        return {"start_ijk": list(self.start), "stop_ijk": list(self.stop), "size": self.size}


def box_centered_on(center_ijk: Sequence[float], size: int = CROP_SIZE) -> CropBox:
    """The crop whose centre is nearest to `center_ijk` (voxel indices; a crop centre lies between voxels)."""
    start = tuple(int(np.floor(float(c) - (size - 1) / 2.0 + 0.5)) for c in center_ijk)
    return CropBox(start, size)  # type: ignore[arg-type]


def box_around_mask(mask: np.ndarray, size: int = CROP_SIZE) -> CropBox:
    """Crop centred on the bounding box of a non-empty binary mask (torchio CropOrPad(mask_name=...))."""
    nonzero = np.argwhere(mask)
    if nonzero.size == 0:
        raise ValueError("cannot centre a crop on an empty mask")
    lo, hi = nonzero.min(axis=0), nonzero.max(axis=0)
    return box_centered_on((lo + hi) / 2.0, size)


def _overlap(box: CropBox, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices into the volume and into the crop for the part of the box inside the volume."""
    vol_slices, crop_slices = [], []
    for start, n in zip(box.start, shape):
        lo, hi = max(start, 0), min(start + box.size, n)
        if hi <= lo:
            lo = hi = max(0, min(start, n))
        vol_slices.append(slice(lo, hi))
        crop_slices.append(slice(lo - start, lo - start + (hi - lo)))
    return tuple(vol_slices), tuple(crop_slices)


def extract_crop(volume: np.ndarray, box: CropBox, fill: float = 0.0) -> np.ndarray:
    """The box's voxels as a size³ array (outside the volume → `fill`), dtype of `volume`."""
    crop = np.full((box.size,) * 3, fill, dtype=volume.dtype)
    vol_slices, crop_slices = _overlap(box, volume.shape)
    crop[crop_slices] = volume[vol_slices]
    return crop


def paste_crop(target: np.ndarray, crop: np.ndarray, box: CropBox) -> None:
    """Write the inside part of `crop` into `target` at the box position (in place)."""
    vol_slices, crop_slices = _overlap(box, target.shape)
    target[vol_slices] = crop[crop_slices]


def crop_view_of(target: np.ndarray, box: CropBox) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(volume slices, crop slices) of the overlap, for callers that merge instead of overwrite."""
    return _overlap(box, target.shape)


def znormalize_foreground(crop: np.ndarray) -> np.ndarray:
    """(x − mean) / std with mean and std over voxels > 0, applied to every voxel (float32).

    This is torchio's ZNormalization(masking_method=lambda x: x > 0), applied to the crop AFTER cropping
    — the order the models were trained with (normalising the whole volume first caused SAM-Med3D's 2025
    Dice regressions). A crop with no positive voxel, or a constant one, is only mean-shifted.
    """
    crop = crop.astype(np.float32, copy=False)
    foreground = crop[crop > 0]
    if foreground.size == 0:
        return crop.copy()
    mean = float(foreground.mean(dtype=np.float64))
    std = float(foreground.std(dtype=np.float64, ddof=1)) if foreground.size > 1 else 0.0  # torch.std: unbiased
    if std == 0.0:
        return crop - np.float32(mean)
    return ((crop - mean) / std).astype(np.float32)
