"""Training samples from real images: pseudo-tasks (`supervoxels`) and real pairs with stronger augmentation (`real`).

* `supervoxels` (ScribblePrompt-style pseudo-labels, reference/quality.md §1): a 128³ crop of a real
  training image at 1.5 mm; on its 64³ half-resolution copy, lightly smoothed and quantised into 4–11
  intensity bins (quantiles), the connected region of one bin (after an opening that cuts thin bridges)
  that holds a random seed near the centre is the target — an intensity-homogeneous region, mostly inside
  the crop, of at least `min_foreground_voxels` and at most a size limit drawn log-uniformly per crop (a
  larger region is split by quantiles of its own intensities, twice at most).
  The image is the real crop, z-normalised like the real dataset's. When 72 seeds find no region (a tiny
  or flat image) the least-cut region seen is used, or, with none at all, a procedural scene.
* `real`: the prepared pairs of data/training_data.py, then intensity augmentation (gamma, contrast, bias,
  noise), thick-slice simulation, zoom (1–1.25, labels nearest-neighbour) and sometimes a rotation (±15°,
  labels nearest-neighbour).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastsam3d_cli.data import appearance as ap
from fastsam3d_cli.data.appearance import chance, randint, uniform
from fastsam3d_cli.data.label_maps import LabelMapVolume
from fastsam3d_cli.data.shapes import small_rotation
from fastsam3d_cli.data.synthetic import ShapesSource, work_size
from fastsam3d_cli.data.training_data import MIN_FOREGROUND_VOXELS
from fastsam3d_cli.imaging.crops import CROP_SIZE, CropBox, extract_crop

MAX_TARGET_FRACTION = 0.08  # of the crop (~420 mL at 1.5 mm): larger regions are mostly background
MIN_LARGEST_FRACTION = 0.004  # the smallest per-crop size limit (~8000 voxels at 128³)
BORDER_FRACTION = 0.1  # at most this share of the target on the crop's outer 2 work voxels


def _erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by the 6-neighbour cross, outside the array counted as False (scipy's binary_erosion
    with its default structure, by array slicing: ~20× faster at 64³)."""
    out = mask.copy()
    for axis in range(mask.ndim):
        m, o = np.moveaxis(mask, axis, 0), np.moveaxis(out, axis, 0)
        o[1:] &= m[:-1]
        o[:-1] &= m[1:]
        o[0] = False
        o[-1] = False
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by the 6-neighbour cross (scipy's binary_dilation with its default structure)."""
    out = mask.copy()
    for axis in range(mask.ndim):
        m, o = np.moveaxis(mask, axis, 0), np.moveaxis(out, axis, 0)
        o[1:] |= m[:-1]
        o[:-1] |= m[1:]
    return out


def _region_at(mask: np.ndarray, seed: tuple[int, ...]) -> np.ndarray | None:
    """The connected part of `mask` that holds `seed`, after an opening that cuts thin bridges (None if the
    opening removed the seed)."""
    from scipy import ndimage

    opened = _dilate(_erode(mask))
    if not opened[seed]:
        return None
    components, _ = ndimage.label(opened)
    return components == components[seed]


def body_threshold(image: np.ndarray) -> float:
    """An intensity above air and the near-zero noise around a head or body: the 35th percentile, and at
    least 10% of the way from the 1st to the 99th percentile (Colin27's background is faint noise > 0)."""
    low, p35, high = np.percentile(image[::3, ::3, ::3], [1, 35, 99])
    return float(max(p35, low + 0.1 * (high - low)))


class SupervoxelSource:
    """Intensity-homogeneous connected regions of real training images as targets (`supervoxels`)."""

    name = "supervoxels"

    def __init__(self, volumes: Sequence[LabelMapVolume], min_foreground_voxels: int = MIN_FOREGROUND_VOXELS,
                 crop_size: int = CROP_SIZE) -> None:
        self.crop_size = int(crop_size)
        self.work_size = work_size(self.crop_size)
        self.volumes = [v for v in volumes if v.image is not None]
        if not self.volumes:
            raise ValueError("no training image to draw pseudo-tasks from")
        self.min_work_voxels = max(1, int(math.ceil(min_foreground_voxels / 8)))
        # a voxel counts as "inside the body" above this intensity (air / background below)
        self.thresholds = [body_threshold(v.image) for v in self.volumes]  # type: ignore[arg-type]

    def sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        fallback: tuple[int, torch.Tensor, np.ndarray] | None = None  # (border voxels, crop, region)
        for _ in range(12):
            which = randint(gen, 0, len(self.volumes))
            image, threshold = self.volumes[which].image, self.thresholds[which]
            assert image is not None
            centre = self._centre(image, threshold, gen)
            box = CropBox(tuple(int(c) - self.crop_size // 2 for c in centre), self.crop_size)  # type: ignore[arg-type]
            crop = torch.from_numpy(extract_crop(image, box, fill=float(image.min())))
            if self.crop_size % self.work_size == 0:
                work = F.avg_pool3d(crop[None, None], self.crop_size // self.work_size)[0, 0]
            else:
                work = F.interpolate(crop[None, None], size=(self.work_size,) * 3, mode="area")[0, 0]
            smooth = ap.gaussian_blur(work, uniform(gen, 0.5, 1.5))
            bins = randint(gen, 4, 12)
            # a size limit per crop, log-uniform from ~2 mL to MAX_TARGET_FRACTION: small regions as often as big
            largest = math.exp(uniform(gen, math.log(MIN_LARGEST_FRACTION), math.log(MAX_TARGET_FRACTION)))
            edges = torch.quantile(smooth[::2, ::2, ::2].flatten(), torch.linspace(0, 1, bins + 1)[1:-1])
            levels = torch.bucketize(smooth, edges).numpy()
            for _ in range(6):
                seed = tuple(randint(gen, self.work_size // 4, 3 * self.work_size // 4) for _ in range(3))
                if smooth[seed] <= threshold:  # air / background is no target
                    continue
                region = _region_at(levels == levels[seed], seed)
                # too large: split the region's own intensities into finer bins (twice at most)
                for _ in range(2):
                    if region is None or int(region.sum()) <= largest * self.work_size ** 3:
                        break
                    values = smooth.numpy()[region]
                    cuts = np.quantile(values, np.linspace(0, 1, randint(gen, 2, 5))[1:-1])
                    finer = np.digitize(smooth.numpy(), cuts)
                    region = _region_at(region & (finer == finer[seed]), seed)
                if region is None:
                    continue
                count = int(region.sum())
                if count < self.min_work_voxels:
                    continue
                border = count - int(region[2:-2, 2:-2, 2:-2].sum())
                if count > largest * self.work_size ** 3 or border > BORDER_FRACTION * count:
                    if fallback is None or border < fallback[0]:
                        fallback = (border, crop, region)
                    continue
                sample = self._finish(crop, region, gen)
                if sample is not None:
                    return sample
        if fallback is not None:  # rare: the least-cut region seen (too large or touching the edge)
            return self._finish(fallback[1], fallback[2], gen, force=True)  # type: ignore[return-value]
        # an image with no region of the right size at all (tiny or flat): a procedural scene instead
        return ShapesSource(self.crop_size).sample(gen)

    def _centre(self, image: np.ndarray, threshold: float, gen: torch.Generator) -> list[int]:
        for _ in range(20):
            ijk = [randint(gen, 0, n) for n in image.shape]
            if image[tuple(ijk)] > threshold:
                return ijk
        return [n // 2 for n in image.shape]

    def _finish(self, crop: torch.Tensor, region: np.ndarray, gen: torch.Generator,
                force: bool = False) -> dict[str, torch.Tensor] | None:
        field = ap.gaussian_blur(torch.from_numpy(region.astype(np.float32)), 0.7) - 0.5  # rounds the stair-steps
        label = ap.upsample(field, self.crop_size) > 0
        if int(label.sum()) < self.min_work_voxels * 8 and not force:
            return None
        mean, std = ap.positive_statistics(crop[::2, ::2, ::2].contiguous())
        image = (crop - mean) / (std if std > 0 else 1.0)
        if chance(gen, 0.5):
            image = intensity_augment(image, gen)
        return {"image": image.float()[None].contiguous(), "label": label.float()[None],
                "valid": torch.ones((1,) + (self.crop_size,) * 3, dtype=torch.bool)}


# ------------------------------------------------------------------------------------------- real (d)
def intensity_augment(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gamma, contrast, smooth multiplicative bias and noise on a z-normalised crop; the result is restandardised
    to the input's mean and std (the model keeps seeing z-normalised crops)."""
    sub = image[::2, ::2, ::2] if image.dim() == 3 else image  # statistics on every 8th voxel: 8× cheaper
    mean, std = float(sub.mean()), float(sub.std())
    low, high = float(image.min()), float(image.max())
    x = image
    if high - low > 1e-6 and chance(gen, 0.4):
        unit = (x - low) / (high - low)
        x = low + (high - low) * unit.pow(math.exp(ap.normal(gen, 0.0, 0.35)))
    if chance(gen, 0.5):
        bias = ap.upsample(torch.exp(uniform(gen, 0.1, 0.4) * torch.randn((4, 4, 4), generator=gen)), x.shape[-1])
        x = low + (x - low) * bias
    if chance(gen, 0.5) and x.dim() == 3 and x.shape[0] == x.shape[1] == x.shape[2]:
        x = x + uniform(gen, 0.0, 0.15) * std * ap.white_noise(gen, x.shape[0])
    sub = x[::2, ::2, ::2] if x.dim() == 3 else x
    new_mean, new_std = float(sub.mean()), float(sub.std())
    return (x - new_mean) / max(new_std, 1e-6) * std + mean


def thick_slices(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Simulate thicker slices (2–5 mm → up to 3.3× the 1.5 mm spacing) along one random axis (image only)."""
    axis = randint(gen, 0, 3)
    size = list(image.shape)
    low = list(size)
    low[axis] = max(8, int(round(size[axis] / uniform(gen, 1.5, 3.3))))
    down = F.interpolate(image[None, None], size=tuple(low), mode="area")
    return F.interpolate(down, size=tuple(size), mode="trilinear", align_corners=False)[0, 0]


def zoom_in(image: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Magnify a random sub-cube by 1–1.25× back to full size (image trilinear, label and valid nearest)."""
    size = image.shape[-1]
    inner = max(8, int(round(size / uniform(gen, 1.0, 1.25))))
    if inner >= size:
        return image, label, valid
    start = [randint(gen, 0, size - inner + 1) for _ in range(3)]
    cut = tuple(slice(s, s + inner) for s in start)
    out = (size,) * 3
    image = F.interpolate(image[cut][None, None], size=out, mode="trilinear", align_corners=False)[0, 0]
    label = F.interpolate(label[cut][None, None], size=out, mode="nearest")[0, 0]
    if not bool(valid.all()):  # an all-valid mask stays all valid
        valid = F.interpolate(valid[cut][None, None].float(), size=out, mode="nearest")[0, 0] > 0.5
    return image, label, valid


_BASE_GRIDS: dict[int, torch.Tensor] = {}


def _base_grid(size: int) -> torch.Tensor:
    """Voxel centres of a size³ crop in grid_sample's normalised (x, y, z) order, align_corners=False (cached)."""
    if size not in _BASE_GRIDS:
        axis = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
        i, j, k = torch.meshgrid(axis, axis, axis, indexing="ij")
        _BASE_GRIDS[size] = torch.stack([k, j, i], dim=-1).reshape(-1, 3)
    return _BASE_GRIDS[size]


def rotate(image: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, gen: torch.Generator,
           max_degrees: float = 15.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate about the crop centre by up to ±max_degrees per axis (image bilinear, label and valid nearest;
    outside the crop: image at its minimum, label 0, valid True)."""
    rotation = small_rotation(gen, max_degrees)
    base = _base_grid(image.shape[-1])  # (S³, 3) normalised (x, y, z) positions
    grid = (base @ rotation.T).view((1,) + tuple(image.shape) + (3,))  # ~20× cheaper than F.affine_grid here
    low = float(image.min())
    image = F.grid_sample((image - low)[None, None], grid, mode="bilinear", align_corners=False)[0, 0] + low
    label = F.grid_sample(label[None, None], grid, mode="nearest", align_corners=False)[0, 0]
    if bool(valid.all()):
        return image, label, valid
    invalid = F.grid_sample((~valid)[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0]
    return image, label, invalid < 0.5


class RealAugmentedSource:
    """The real prepared pairs (an InteractiveCropDataset) with stronger augmentation (`real`)."""

    name = "real"
    CYCLE = 1000  # the wrapped dataset's epoch key for pass c of epoch e: e * CYCLE + c (no repeated crop)

    def __init__(self, dataset: Any, p_rotate: float = 0.1, p_zoom: float = 0.35,
                 p_thick: float = 0.25, p_intensity: float = 0.7) -> None:
        if dataset is None:
            raise ValueError("the real source needs the prepared dataset")
        self.dataset = dataset
        self.p_rotate, self.p_zoom, self.p_thick, self.p_intensity = p_rotate, p_zoom, p_thick, p_intensity

    def sample_real(self, rank: int, epoch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        count = len(self.dataset)
        self.dataset.set_epoch(epoch * self.CYCLE + rank // count)
        item = self.dataset[rank % count]
        image, label, valid = item["image"][0], item["label"][0], item["valid"][0]
        minimum = min(float(label.sum()), float(getattr(self.dataset, "min_foreground_voxels", MIN_FOREGROUND_VOXELS)))
        for p, transform in ((self.p_zoom, zoom_in), (self.p_rotate, rotate)):
            if chance(gen, p):
                moved = transform(image, label, valid, gen)
                if float(moved[1].sum()) >= minimum:  # never a target the transform pushed out of the crop
                    image, label, valid = moved
        if chance(gen, self.p_thick):
            image = thick_slices(image, gen)
        if chance(gen, self.p_intensity):
            image = intensity_augment(image, gen)
        return {"image": image.float()[None].contiguous(), "label": label.float()[None].contiguous(),
                "valid": valid[None].contiguous()}

    def sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """A random real sample (for benchmarks): rank and epoch drawn from the generator."""
        return self.sample_real(randint(gen, 0, len(self.dataset)), 0, gen)
