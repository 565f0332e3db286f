"""Prepared samples → 128³ model crops: the torch Dataset for training, and the fixed crop for validation.

Training crop (SAM-Med3D's train-time transform, reference/models.md §3):
  read → canonical RAS+ orientation (`imaging.to_canonical`, a lossless axis permutation) → 128³ crop
  centred on the label's bounding box, shifted by a random offset of up to `max_shift` voxels per axis
  (outside the volume → 0) → random flip of each axis (p = 0.5) → z-normalisation over the crop's voxels
  > 0 (AFTER cropping, the order the models were trained with). A crop with fewer than
  `min_foreground_voxels` label voxels is redrawn: a new shift, then another sample. Samples whose label
  is empty are found when the dataset is built (the manifest's voxel count, else one read of the small
  uint8 label) and left out, so training never meets an empty target.
Validation crop: the same without shift and flips.

Randomness is a pure function of (seed, epoch, index), never of worker processes or of what ran before,
so runs are reproducible with any `--workers` and resume exactly.
"""
from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fastsam3d_cli.imaging.crops import (CROP_SIZE, CropBox, box_around_mask, box_centered_on, extract_crop,
                                 znormalize_foreground)
from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.data.prepared import PreparedSample

MIN_FOREGROUND_VOXELS = 1000  # SAM-Med3D redraws training crops with <= 1000 label voxels
MAX_SHIFT_VOXELS = 16  # ±24 mm at 1.5 mm
MAX_DRAWS = 20


@dataclass
class SampleArrays:
    """One (case, class) in canonical orientation: image float32, label bool, valid bool or None (ijk order)."""

    image: np.ndarray
    label: np.ndarray
    valid: np.ndarray | None


@dataclass
class ModelCrop:
    """A 128³ crop ready for the model: z-normalised image, binary label, valid mask (None = all voxels)."""

    image: np.ndarray  # float32 (S, S, S)
    label: np.ndarray  # bool (S, S, S)
    valid: np.ndarray | None  # bool (S, S, S); False = ignore voxel
    box: CropBox  # in the canonical volume's voxel indices (before any flip)
    flips: tuple[bool, bool, bool] = (False, False, False)


# --------------------------------------------------------------------------------------------- reading
class _ArrayCache:
    """Small LRU of canonical arrays keyed by file identity (prepared images are hard links shared by classes)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, dtype: type) -> np.ndarray:
        stat = os.stat(path)
        key = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size, np.dtype(dtype).str)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        array = read_canonical_array(path, dtype)
        with self._lock:
            self._items[key] = array
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return array


def read_canonical_array(path: Path, dtype: type) -> np.ndarray:
    """A volume file as an ijk array in canonical RAS+ orientation (BadInputError when unreadable)."""
    from fastsam3d_cli.imaging.volumes import array_ijk, read_image, to_canonical

    return array_ijk(to_canonical(read_image(path, what="prepared volume")), dtype)


def load_sample(sample: PreparedSample, cache: _ArrayCache | None = None) -> SampleArrays:
    """Read one prepared sample (image, binary label, optional ignore mask) in canonical orientation."""
    image = cache.get(sample.image_path, np.float32) if cache else read_canonical_array(sample.image_path, np.float32)
    label = read_canonical_array(sample.label_path, np.uint8) > 0
    if sample.voxels is not None and int(np.count_nonzero(label)) != int(sample.voxels):
        # The file changed since prepare wrote it (cut, replaced, emptied): never train on other data silently.
        raise BadInputError(f"prepared label {sample.label_path} has {int(np.count_nonzero(label))} label voxels, "
                            f"the manifest records {int(sample.voxels)}: it changed since prepare wrote it",
                            "re-run the same fastsam3d prepare command (it redoes changed cases)")
    if label.shape != image.shape:
        raise BadInputError(f"{sample.label_path} ({label.shape}) and its image {sample.image_path} ({image.shape}) "
                            "have different sizes", "re-run fastsam3d prepare into a new folder")
    valid = None
    if sample.ignore_path is not None:
        valid = read_canonical_array(sample.ignore_path, np.uint8) == 0
    return SampleArrays(image, label, valid)


# ---------------------------------------------------------------------------------------------- crops
def crop_sample(arrays: SampleArrays, box: CropBox, flips: Sequence[bool] = (False, False, False)) -> ModelCrop:
    """Cut `box` out of the sample (zero outside), flip the chosen axes, z-normalise the image over voxels > 0."""
    image = extract_crop(arrays.image, box)
    label = extract_crop(arrays.label, box)
    valid = None if arrays.valid is None else extract_crop(arrays.valid, box, fill=True)
    axes = tuple(axis for axis, flip in enumerate(flips) if flip)
    if axes:
        image, label = np.flip(image, axes), np.flip(label, axes)
        valid = None if valid is None else np.flip(valid, axes)
    image = znormalize_foreground(np.ascontiguousarray(image))
    return ModelCrop(image, np.ascontiguousarray(label), None if valid is None else np.ascontiguousarray(valid),
                     box, tuple(bool(f) for f in flips))  # type: ignore[arg-type]


def validation_crop(arrays: SampleArrays, size: int = CROP_SIZE) -> ModelCrop | None:
    """The crop centred on the label's bounding box, no augmentation; None for an empty label."""
    if not arrays.label.any():
        return None
    return crop_sample(arrays, box_around_mask(arrays.label, size))


def crop_to_tensors(crop: ModelCrop) -> dict[str, torch.Tensor]:
    """(1, S, S, S) tensors: image float32, label float32 {0, 1}, valid bool (all True when no ignore mask)."""
    valid = np.ones(crop.label.shape, dtype=bool) if crop.valid is None else crop.valid
    return {"image": torch.from_numpy(crop.image).unsqueeze(0),
            "label": torch.from_numpy(crop.label.astype(np.float32)).unsqueeze(0),
            "valid": torch.from_numpy(valid).unsqueeze(0)}


# -------------------------------------------------------------------------------------------- dataset
def sample_name(sample: PreparedSample) -> str:
    """`dataset/case/class`, how warnings and errors name a sample."""
    return f"{sample.dataset}/{sample.case}/{sample.class_name}"


def describe_samples(samples: Sequence[PreparedSample], limit: int = 5) -> str:
    """The first `limit` sample names, then how many more."""
    names = [sample_name(s) for s in samples[:limit]]
    if len(samples) > limit:
        names.append(f"… {len(samples) - limit} more")
    return ", ".join(names)


def label_voxels(sample: PreparedSample) -> int:
    """Label voxels of a sample: the manifest's count when known, else counted from the file (read once)."""
    if sample.voxels is not None:
        return int(sample.voxels)
    return int(np.count_nonzero(read_canonical_array(sample.label_path, np.uint8)))


EMPTY_WARNINGS_NAMED = 10  # empty labels named one per warning line; the rest are counted


def empty_label_warnings(empty: Sequence[PreparedSample]) -> list[str]:
    """One warning per skipped empty label (the first ten), then one line counting the rest."""
    lines = [f"{sample_name(s)}: the label is empty ({s.label_path}); sample skipped"
             for s in empty[:EMPTY_WARNINGS_NAMED]]
    if len(empty) > EMPTY_WARNINGS_NAMED:
        lines.append(f"… and {len(empty) - EMPTY_WARNINGS_NAMED} more sample(s) with an empty label skipped "
                     f"({len(empty)} in all)")
    return lines


def run_warnings(samples: Sequence[PreparedSample], amp: bool, device: torch.device) -> list[str]:
    """Warnings train and distill give before a run: --amp off CUDA, data not prepared at the model spacing."""
    from fastsam3d_cli.imaging.crops import MODEL_SPACING_MM

    warnings = []
    if amp and device.type != "cuda":
        warnings.append("--amp only applies on CUDA; training in float32 on the CPU")
    spacings = sorted({s.spacing_mm for s in samples if s.spacing_mm is not None})
    if any(abs(s - MODEL_SPACING_MM) > 1e-6 for s in spacings):
        warnings.append(f"data prepared at {', '.join(f'{s:g}' for s in spacings)} mm; the models work at "
                        f"{MODEL_SPACING_MM:g} mm")
    return warnings


def all_labels_empty_error(empty: Sequence[PreparedSample], what: str) -> BadInputError:
    """The one-line error when every selected label is empty (`what`: "train" or "distil")."""
    return BadInputError(f"every prepared label is empty ({len(empty)} sample(s): {describe_samples(empty)}): "
                         f"nothing to {what} on",
                         "re-run fastsam3d prepare, or check the labels (a training pair needs foreground)")


class InteractiveCropDataset(Dataset):
    """Augmented 128³ training crops of prepared samples; item i of epoch e is a function of (seed, e, i).

    Items are dicts of (1, S, S, S) tensors `image`, `label`, `valid` plus `sample_index` (which sample was
    used after any redraw). Left out up front (`excluded`): samples whose label is empty (`empty`: found from
    the manifest's voxel count, or by reading the label once when the count is unknown) and samples whose
    prepared label is known to have fewer than `min_foreground_voxels` voxels; crops that end up below it
    are redrawn. BadInputError (exit 3) when no sample remains — raised here, before any run folder exists.
    """

    def __init__(self, samples: Sequence[PreparedSample], seed: int = 2023, augment: bool = True,
                 max_shift: int = MAX_SHIFT_VOXELS, min_foreground_voxels: int = MIN_FOREGROUND_VOXELS,
                 crop_size: int = CROP_SIZE, cache_size: int = 4) -> None:
        counts = [label_voxels(s) for s in samples]
        self.empty = [s for s, n in zip(samples, counts) if n == 0]
        small = [n == 0 or (s.voxels is not None and n < min_foreground_voxels) for s, n in zip(samples, counts)]
        self.samples = [s for s, left_out in zip(samples, small) if not left_out]
        self.excluded = [s for s, left_out in zip(samples, small) if left_out]
        if not self.samples:
            if samples and len(self.empty) == len(samples):
                raise all_labels_empty_error(self.empty, "train")
            raise BadInputError(f"no prepared sample has at least {min_foreground_voxels} label voxels "
                                f"({len(samples)} sample(s), {len(self.empty)} with an empty label, "
                                f"largest {max(counts, default=0)})",
                                "lower --min-foreground, or prepare larger structures")
        self.seed, self.augment, self.max_shift = int(seed), augment, int(max_shift)
        self.min_foreground_voxels, self.crop_size = int(min_foreground_voxels), int(crop_size)
        self.epoch = 0
        self._cache = _ArrayCache(cache_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations `__getitem__` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return sample_name(self.samples[index])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        best: tuple[int, ModelCrop, int] | None = None
        sample_index = int(index)
        for draw in range(MAX_DRAWS):
            if draw > 0 and draw % 2 == 0:  # two shifts per sample, then another sample
                sample_index = int(rng.integers(len(self.samples)))
            crop = self._random_crop(load_sample(self.samples[sample_index], self._cache), rng)
            foreground = int(crop.label.sum())
            if best is None or foreground > best[0]:
                best = (foreground, crop, sample_index)
            if foreground >= self.min_foreground_voxels:
                break
        assert best is not None
        foreground, crop, sample_index = best
        if foreground == 0:
            # Every draw missed the label (possible only for a label spread wider than the crop, or a file that
            # was emptied after the dataset was built): centre a crop on one of its voxels instead. An empty
            # target (the emptied file) is still no crash: no click is drawn and the loss is well defined.
            arrays = load_sample(self.samples[int(index)], self._cache)
            voxels = np.argwhere(arrays.label)
            if len(voxels):
                centre = voxels[int(rng.integers(len(voxels)))]
                crop, sample_index = crop_sample(arrays, box_centered_on(centre, self.crop_size)), int(index)
        return {**crop_to_tensors(crop), "sample_index": sample_index}

    def _random_crop(self, arrays: SampleArrays, rng: np.random.Generator) -> ModelCrop:
        if not arrays.label.any():
            return crop_sample(arrays, CropBox((0, 0, 0), self.crop_size))
        box = box_around_mask(arrays.label, self.crop_size)
        if self.augment and self.max_shift > 0:
            box = box.shifted(rng.integers(-self.max_shift, self.max_shift + 1, size=3).tolist())
        flips = tuple(bool(f) for f in rng.random(3) < 0.5) if self.augment else (False, False, False)
        return crop_sample(arrays, box, flips)
