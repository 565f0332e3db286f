"""Generated training samples for `train --data-mix`: the painting shared by the generated sources, and the
`shapes` and `synth-labels` sources (data/mixing.py mixes them; data/pseudo_tasks.py has the other two).

Every source returns what the real dataset (data/training_data.py) returns: `image` (1, S, S, S) float32
z-normalised over voxels > 0, `label` (1, S, S, S) float32 {0, 1}, `valid` all True (S = the model's crop
size, 128). Sources:

* `synth-labels` — domain-randomised images of real label maps (SynthSeg-style): a label map is cut at a
  random pose (rotation, scale, elastic warp, flips), every label painted with a random intensity (half
  CT-like Hounsfield clusters, half fully random) and texture, then bias, low resolution or thick slices,
  blur, gamma and noise; the target is one label or a label with the labels it touches.
* `shapes` — procedural scenes (data/shapes.py): blobs, tubes, vessel trees, sheets, touching and nested
  objects on textured backgrounds, painted the same way.
* `supervoxels` — pseudo-tasks on real images (data/pseudo_tasks.py).
* `real` — the prepared real pairs with stronger augmentation (data/pseudo_tasks.py).

Scenes are built on a 64³ work grid (3 mm cells) and upsampled to the 128³ crop: the cost of a sample is a
few full-size operations. A target has at least `min_foreground_voxels` voxels and lies inside the crop
(a pose is redrawn otherwise). Sample i of epoch e is a pure function of (seed, e, i, source).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastsam3d_cli.data import appearance as ap
from fastsam3d_cli.data.appearance import chance, randint, uniform
from fastsam3d_cli.data.label_maps import LabelMapVolume
from fastsam3d_cli.data.shapes import coordinates, generate_scene, small_rotation
from fastsam3d_cli.data.training_data import MIN_FOREGROUND_VOXELS
from fastsam3d_cli.imaging.crops import CROP_SIZE

MAX_TARGET_FRACTION = 0.35  # of the crop: larger targets are redrawn (nothing left to click around)
MAX_BORDER_FRACTION = 0.05  # of the target's work voxels on the crop's outer face: more is redrawn (cut off)
MAX_TRIES = 8
MIN_ZOOM = 0.6  # a target larger than the crop shows at most this much smaller (else it is not drawn)
FIT_SHARE = 0.85  # the target's bounding box within this share of the crop


def generator_for(seed: int, epoch: int, index: int, stream: int) -> torch.Generator:
    """A torch generator seeded from (seed, epoch, index, stream) through numpy's SeedSequence."""
    value = np.random.SeedSequence([int(seed), int(epoch), int(index), int(stream)]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(value[0] >> np.uint64(1)))


# ------------------------------------------------------------------------------------- rendering
def ring_labels(mask: torch.Tensor, labels: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Labels of the voxels just outside `mask` (shifted copies of the mask along each axis; the shifts wrap at
    the crop's faces, where targets are not: a target cut by the crop is redrawn)."""
    grown = mask.clone()
    for axis in range(3):
        for shift in (-width, width):
            grown |= torch.roll(mask, shifts=shift, dims=axis)
    return labels[grown & ~mask]


MAJOR_NEIGHBOUR_SHARE = 0.15  # a label with at least this share of the target's surroundings must contrast


def separate_target(means: torch.Tensor, sds: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
                    target_values: Sequence[int], gen: torch.Generator, ct_like: bool) -> float | None:
    """Give the target a mean that differs by ≥ `needed` (~2 sd) from that of every label making up at least
    15% of its surroundings, most of the time (in place); returns `needed`, or None when left as drawn.

    Real targets are visible; a target painted like its neighbours teaches nothing — and one painted between
    a darker and a brighter neighbour can still match each of them. 10% are left as drawn (low-contrast
    cases exist).
    """
    if chance(gen, 0.1):
        return None
    around = ring_labels(target, labels)
    if around.numel() == 0:
        return None
    counts = torch.bincount(around, minlength=len(means)).float()
    majors = [int(v) for v in torch.nonzero(counts >= MAJOR_NEIGHBOUR_SHARE * counts.sum()).flatten()
              if int(v) not in target_values]
    if not majors:
        return None
    spread = float(sds.mean())
    needed = max(2.0 * spread, 40.0 if ct_like else 25.0)
    others = [float(means[v]) for v in majors]

    def clear(value: float) -> bool:
        return all(abs(value - other) >= needed for other in others)

    low, high = min(others) - 2.5 * needed, max(others) + 2.5 * needed
    for value in target_values:
        if clear(float(means[value])):
            continue
        for _ in range(12):  # a random level that clears every major neighbour
            candidate = uniform(gen, low, high)
            if clear(candidate):
                break
        else:  # brighter or darker than all of them
            candidate = (max(others) + 1.5 * needed) if chance(gen, 0.5) else (min(others) - 1.5 * needed)
        means[value] = candidate
    for value in target_values:  # the texture of a target stays below its contrast
        sds[value] = min(float(sds[value]), needed * 0.6)
    return needed


def render(labels: torch.Tensor, target_field: torch.Tensor, target_values: Sequence[int], gen: torch.Generator,
           names: Sequence[str] | None = None, out_size: int = CROP_SIZE,
           force: bool = False, min_foreground_voxels: int = MIN_FOREGROUND_VOXELS) -> dict[str, torch.Tensor] | None:
    """Paint a work-grid label scene and cut the target: the sample dict, or None when the target is too small
    too large, or cut by the crop's edge."""
    inside = target_field > 0
    work_voxels = int(inside.sum())
    cut = work_voxels - int(inside[1:-1, 1:-1, 1:-1].sum()) > MAX_BORDER_FRACTION * work_voxels
    if work_voxels == 0 or (cut and not force):
        return None
    label = ap.upsample(target_field, out_size) > 0
    voxels = int(label.sum())
    if voxels == 0 or (not force and not min_foreground_voxels <= voxels <= MAX_TARGET_FRACTION * out_size ** 3):
        return None
    ct_like = chance(gen, 0.5)
    count = int(labels.max()) + 1
    means, sds = ap.label_intensities(gen, count, ct_like, names)
    separate_target(means, sds, labels, inside, target_values, gen, ct_like)
    work = ap.paint(labels, means, sds, gen, texture_scale=uniform(gen, 0.3, 1.0))
    noise = uniform(gen, 5.0, 40.0) if ct_like else uniform(gen, 0.0, 12.0)
    air = uniform(gen, 0.0, 0.2) if not ct_like and chance(gen, 0.3) else None  # MR-like air ≈ 0
    image = ap.finish_image(work, gen, out_size, noise_sd=noise, bias_strength=uniform(gen, 0.0, 0.5),
                            ct_like=ct_like, air_floor=air)
    return {"image": image.float()[None].contiguous(), "label": label.float()[None],
            "valid": torch.ones((1,) + (out_size,) * 3, dtype=torch.bool)}


# ------------------------------------------------------------------------------------------ shapes
class ShapesSource:
    """Procedural scenes (data/shapes.py) painted with random appearance."""

    name = "shapes"

    def __init__(self, crop_size: int = CROP_SIZE, min_foreground_voxels: int = MIN_FOREGROUND_VOXELS) -> None:
        self.crop_size = int(crop_size)
        self.min_foreground_voxels = int(min_foreground_voxels)

    def sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        tries = MAX_TRIES * 2
        for attempt in range(tries + MAX_TRIES):  # the last tries accept any non-empty target: never an error
            scene = generate_scene(gen, work_size(self.crop_size))
            sample = render(scene.labels, scene.target_field, scene.target_labels, gen, out_size=self.crop_size,
                            force=attempt >= tries, min_foreground_voxels=self.min_foreground_voxels)
            if sample is not None:
                return sample
        raise RuntimeError("no shapes scene with a target")  # pragma: no cover - 8 empty targets in a row


# ---------------------------------------------------------------------------------- label maps (a)
@dataclass
class Pose:
    """Where the crop sits in a label map: centre (voxels), rotation, zoom (>1 magnifies), flips."""

    centre: torch.Tensor
    rotation: torch.Tensor
    zoom: float
    flips: tuple[bool, bool, bool]


def work_size(crop_size: int) -> int:
    """Work-grid voxels per side for a crop: half its size (64 for the 128³ crop)."""
    return max(8, int(crop_size) // 2)


def sample_grid(shape: Sequence[int], pose: Pose, size: int, elastic_voxels: float,
                gen: torch.Generator, crop_size: int = CROP_SIZE) -> torch.Tensor:
    """grid_sample grid (1, S, S, S, 3) mapping work voxels to the label map (align_corners=True)."""
    cell = crop_size / size  # source voxels (1.5 mm) per work voxel, before zoom
    offsets = (coordinates(size) - (size - 1) / 2.0) * (cell / pose.zoom)
    for axis, flip in enumerate(pose.flips):
        if flip:
            offsets[axis] = -offsets[axis]  # mirror the crop about its centre along this axis
    points = torch.einsum("ij,jxyz->ixyz", pose.rotation, offsets) + pose.centre.view(3, 1, 1, 1)
    if elastic_voxels > 0:
        points = points + elastic_voxels * ap.smooth_noise(gen, size, randint(gen, 3, 6), channels=3)
    extent = torch.tensor([float(n - 1) for n in shape]).view(3, 1, 1, 1)
    normalised = points / extent.clamp_min(1.0) * 2 - 1
    return normalised.flip(0).permute(1, 2, 3, 0)[None]  # grid_sample wants (x, y, z) = (k, j, i)


class LabelMapSource:
    """SynthSeg-style domain-randomised images of real label maps (`synth-labels`)."""

    name = "synth-labels"

    def __init__(self, volumes: Sequence[LabelMapVolume], min_foreground_voxels: int = MIN_FOREGROUND_VOXELS,
                 p_union: float = 0.3, crop_size: int = CROP_SIZE) -> None:
        self.volumes = list(volumes)
        self.crop_size = int(crop_size)
        self.min_foreground_voxels = int(min_foreground_voxels)
        self.p_union = p_union
        # targets: labels big enough that fit the crop at the smallest zoom
        largest = FIT_SHARE * self.crop_size / MIN_ZOOM
        self.candidates = [[v for v, n in volume.counts.items() if n >= min_foreground_voxels
                            and float((volume.boxes[v][1] - volume.boxes[v][0]).max()) <= largest]
                           for volume in self.volumes]
        if not any(self.candidates):
            from fastsam3d_cli.errors import BadInputError

            raise BadInputError(f"no label of the --label-maps datasets has at least {min_foreground_voxels} voxels "
                                f"at 1.5 mm and fits a {self.crop_size}³ crop",
                                "give datasets with larger structures, or lower --min-foreground")
        self.fallback = ShapesSource(self.crop_size)

    def sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        usable = [i for i, c in enumerate(self.candidates) if c]
        for attempt in range(MAX_TRIES):  # later attempts drop unions (a union may not fit the crop)
            volume_index = usable[randint(gen, 0, len(usable))]
            volume, candidates = self.volumes[volume_index], self.candidates[volume_index]
            values = self._target(volume, candidates, gen)
            sample = self._render(volume, values if attempt < MAX_TRIES // 2 else values[:1], gen)
            if sample is not None:
                return sample
        return self.fallback.sample(gen)  # rare (e.g. every pose warped the target too small): never an error

    def _target(self, volume: LabelMapVolume, candidates: list[int], gen: torch.Generator) -> list[int]:
        first = candidates[randint(gen, 0, len(candidates))]
        values = [first]
        neighbours = sorted(volume.touching.get(first, ()))
        if neighbours and chance(gen, self.p_union):
            for _ in range(randint(gen, 1, 3)):
                values.append(neighbours[randint(gen, 0, len(neighbours))])
        return sorted(set(values))

    def _pose(self, volume: LabelMapVolume, values: list[int], gen: torch.Generator) -> Pose:
        lo = np.min([volume.boxes[v][0] for v in values], axis=0)
        hi = np.max([volume.boxes[v][1] for v in values], axis=0)
        extent = float((hi - lo).max())  # source voxels
        zoom = math.exp(uniform(gen, math.log(0.85), math.log(1.2)))
        fit = FIT_SHARE * self.crop_size / max(extent, 1.0)  # the whole target inside 85% of the crop
        zoom = max(min(zoom, fit), MIN_ZOOM)
        slack = np.maximum(0.0, FIT_SHARE * self.crop_size / zoom - (hi - lo)) / 2  # how far the centre may move
        centre = (lo + hi - 1) / 2 + np.array([uniform(gen, -s, s) for s in slack])
        rotation = small_rotation(gen, 15.0 if chance(gen, 0.8) else 40.0)
        flips = tuple(chance(gen, 0.5) for _ in range(3))
        return Pose(torch.tensor(centre, dtype=torch.float32), rotation, zoom, flips)  # type: ignore[arg-type]

    def _render(self, volume: LabelMapVolume, values: list[int], gen: torch.Generator) -> dict[str, torch.Tensor] | None:
        pose = self._pose(volume, values, gen)
        grid = sample_grid(volume.labels.shape, pose, work_size(self.crop_size), elastic_voxels=uniform(gen, 0.0, 3.0),
                           gen=gen, crop_size=self.crop_size)
        labels = F.grid_sample(volume.label_tensor(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=True)[0, 0].long()
        shifted = [v + 1 for v in values]  # label_tensor holds value + 1
        # relabel compactly (a lookup table: torch.unique sorts) so the intensity table stays small
        counts = torch.bincount(labels.flatten())
        present = torch.nonzero(counts).flatten()
        table = torch.zeros(len(counts), dtype=torch.int64)
        table[present] = torch.arange(len(present))
        compact = table[labels]
        is_target = torch.zeros(len(counts) + max(shifted) + 1, dtype=torch.bool)
        is_target[torch.tensor(shifted)] = True
        target = is_target[labels]
        names = ["outside" if int(v) == 0 else volume.names.get(int(v) - 1, "background") for v in present]
        target_values = [i for i, v in enumerate(present.tolist()) if v in shifted]
        return render(compact, target.float() - 0.5, target_values, gen, names=names, out_size=self.crop_size,
                      min_foreground_voxels=self.min_foreground_voxels)

