"""Multi-label maps (and their images) of nnU-Net training datasets, at 1.5 mm, read once per process.

The sources of generated training data (data/synthetic.py) draw from these: domain-randomised images from
the label maps, pseudo-tasks from the images. Labels are resampled nearest-neighbour (never interpolated),
images linearly; both in canonical RAS+ orientation. Each map also keeps, per label value, its voxel count
and bounding box, and which labels touch (share a face), so a sample can pick a target without scanning.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.imaging.crops import MODEL_SPACING_MM


@dataclass
class LabelMapVolume:
    """One case: label values (int16, ijk, canonical, 1.5 mm), optional image, per-label statistics."""

    name: str  # dataset/case
    labels: np.ndarray
    names: dict[int, str]  # label value → structure name
    counts: dict[int, int] = field(default_factory=dict)
    boxes: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # value → (lo, hi) voxel
    touching: dict[int, set[int]] = field(default_factory=dict)
    image: np.ndarray | None = None  # float32, same grid
    _label_tensor: torch.Tensor | None = None

    def label_tensor(self) -> torch.Tensor:
        """(1, 1, I, J, K) float32 of label value + 1 (0 is reserved for 'outside the volume'), built once."""
        if self._label_tensor is None:
            self._label_tensor = torch.from_numpy(self.labels.astype(np.float32) + 1.0)[None, None]
        return self._label_tensor


def label_statistics(labels: np.ndarray) -> tuple[dict[int, int], dict[int, tuple[np.ndarray, np.ndarray]],
                                                   dict[int, set[int]]]:
    """Per non-zero label: voxel count, bounding box (lo inclusive, hi exclusive), face-touching labels."""
    values, counts = np.unique(labels, return_counts=True)
    count_of = {int(v): int(c) for v, c in zip(values, counts) if v != 0}
    lows: dict[int, list[int]] = {v: [] for v in count_of}
    highs: dict[int, list[int]] = {v: [] for v in count_of}
    for axis in range(3):  # per axis: the slices each label appears in (numpy only, no scipy at run time)
        present: dict[int, list[int]] = {v: [] for v in count_of}
        for index in range(labels.shape[axis]):
            for value in np.unique(np.take(labels, index, axis=axis)):
                if int(value) in present:
                    present[int(value)].append(index)
        for value, indices in present.items():
            lows[value].append(min(indices))
            highs[value].append(max(indices) + 1)
    boxes = {v: (np.array(lows[v]), np.array(highs[v])) for v in count_of}
    touching: dict[int, set[int]] = {v: set() for v in count_of}
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        first, second = a[:-1].ravel(), a[1:].ravel()
        differ = (first != second) & (first != 0) & (second != 0)
        pairs = np.unique(np.stack([first[differ], second[differ]]).astype(np.int64), axis=1)
        for x, y in pairs.T:
            touching[int(x)].add(int(y))
            touching[int(y)].add(int(x))
    return count_of, boxes, touching


def _read(path: Path, interpolation: str, dtype: type) -> np.ndarray:
    from fastsam3d_cli.imaging.volumes import array_ijk, read_image, resample_to_spacing, to_canonical

    image = to_canonical(read_image(path, what="label map" if interpolation == "nearest" else "image"))
    return array_ijk(resample_to_spacing(image, MODEL_SPACING_MM, interpolation=interpolation), dtype)  # type: ignore[arg-type]


def load_label_maps(root: Path, with_images: bool = False) -> list[LabelMapVolume]:
    """Every training case of one nnU-Net raw dataset folder (BadInputError for an unusable folder)."""
    from fastsam3d_cli.data.nnunet import load_raw_dataset

    dataset = load_raw_dataset(Path(root), channel=None)
    names = {}
    for label_class in dataset.classes:
        for value in label_class.values:
            names[int(value)] = label_class.name
    volumes = []
    for case in dataset.cases:
        labels = _read(case.label_path, "nearest", np.int16)
        counts, boxes, touching = label_statistics(labels)
        image = _read(case.image_path, "linear", np.float32) if with_images else None
        if image is not None and image.shape != labels.shape:
            raise BadInputError(f"{dataset.name}/{case.case_id}: image {image.shape} and label map {labels.shape} "
                                "differ at 1.5 mm", "check that the image and its label share one grid")
        volumes.append(LabelMapVolume(f"{dataset.name}/{case.case_id}", labels, names, counts, boxes, touching,
                                      image))
    return volumes


_CACHE: dict[tuple[str, bool], list[LabelMapVolume]] = {}
_LOCK = threading.Lock()


def cached_label_maps(roots: Sequence[Path], with_images: bool = False) -> list[LabelMapVolume]:
    """`load_label_maps` of each folder, read once per process (a folder read with images serves both)."""
    volumes = []
    for root in roots:
        key = str(Path(root).expanduser().resolve())
        with _LOCK:
            found = _CACHE.get((key, True)) or (None if with_images else _CACHE.get((key, False)))
        if found is None:
            found = load_label_maps(Path(root), with_images)
            with _LOCK:
                _CACHE[(key, with_images)] = found
        volumes.extend(found)
    return volumes


VALIDATION_FOLDER = "validation"


def check_label_map_folders(roots: Sequence[Path], option: str = "--label-maps") -> list[Path]:
    """Existing dataset folders, none inside a `validation/` folder (held-out data is never trained on)."""
    checked = []
    for root in roots:
        path = Path(root).expanduser().absolute()
        if VALIDATION_FOLDER in path.parts:
            raise BadInputError(f"{option} {path} lies in a '{VALIDATION_FOLDER}' folder, which no training may use",
                                "give nnU-Net training dataset folders")
        if not path.is_dir():
            raise BadInputError(f"{option} {path} is not a folder", "give nnU-Net dataset folders (with dataset.json)")
        checked.append(path)
    return checked
