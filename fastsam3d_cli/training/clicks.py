"""Click SIMULATION: the next corrective click a user would make, from the current prediction and the truth.

Used by `train` (random clicks), `validate` (ritm for clicks 1–2, random after) and `distill`. Click FILES
(what a user writes) live in `clickfile.py`.

Reference behaviour (SAM-Med3D / FastSAM3D `utils/click_method.py`, see reference/models.md §4):

* error regions: FN = gt ∧ ¬pred (missed target, needs an include click), FP = ¬gt ∧ pred (leak, needs an
  exclude click);
* `random`: a voxel drawn uniformly from FN ∪ FP, label 1 if it lies in FN, else 0;
* `ritm`: the Euclidean distance transform of FN and of FP (each zero-padded by one voxel so the crop
  border counts as outside); the region with the larger maximum distance wins, and the click is drawn
  uniformly among its voxels with distance > max/2 — the interior of the larger error, where a person
  would click.

Conventions: masks are (D, H, W) boolean arrays/tensors of one 128³ crop; a click position is a voxel
index in that crop's axis order (axis 0, axis 1, axis 2) — what `Sam3D.decode` takes. Predictions are
binarised as logits > 0 (sigmoid > 0.5). An optional `valid` mask (False = nnU-Net "ignore" voxel) keeps
clicks out of unannotated voxels.

Well-defined corner cases (the reference crashes on an empty target, SAM-Med3D issue #112):

* no error at all and a non-empty target: a confirming include click inside the target (uniform for
  `random`, in its interior for `ritm`);
* nothing to click (empty target and empty prediction): `None` — the caller skips the case with a warning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

ClickMethod = Literal["random", "ritm"]
CLICK_METHODS: tuple[str, ...] = ("random", "ritm")


@dataclass(frozen=True)
class SimulatedClick:
    """One click: `position` = voxel index (axis 0, axis 1, axis 2) in the crop; `label` 1 include, 0 exclude."""

    position: tuple[int, int, int]
    label: int


# ---------------------------------------------------------------------------------------- error regions
def error_regions(prediction: torch.Tensor, target: torch.Tensor,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(false negatives, false positives) of boolean (D, H, W) masks, restricted to `valid` voxels."""
    prediction, target = prediction.bool(), target.bool()
    false_negative = target & ~prediction
    false_positive = ~target & prediction
    if valid is not None:
        false_negative &= valid.bool()
        false_positive &= valid.bool()
    return false_negative, false_positive


def _uniform_voxel(region: torch.Tensor, rng: np.random.Generator) -> tuple[int, int, int]:
    """A voxel of a non-empty boolean (D, H, W) region, uniformly; row-major order makes it reproducible."""
    flat = torch.nonzero(region.reshape(-1)).squeeze(1)
    chosen = int(flat[int(rng.integers(flat.numel()))])
    d, h, w = region.shape
    return chosen // (h * w), (chosen // w) % h, chosen % w


# ------------------------------------------------------------------------------------------- random
def random_click(prediction: torch.Tensor, target: torch.Tensor, rng: np.random.Generator,
                 valid: torch.Tensor | None = None) -> SimulatedClick | None:
    """A uniform voxel of FN ∪ FP, label 1 when it is a false negative (None when nothing to click)."""
    false_negative, false_positive = error_regions(prediction, target, valid)
    errors = false_negative | false_positive
    if bool(errors.any()):
        position = _uniform_voxel(errors, rng)
        return SimulatedClick(position, int(bool(false_negative[position])))
    return _confirming_click(target, valid, rng, interior=False)


# --------------------------------------------------------------------------------------------- ritm
def ritm_click(prediction: torch.Tensor, target: torch.Tensor, rng: np.random.Generator,
               valid: torch.Tensor | None = None) -> SimulatedClick | None:
    """A uniform voxel of the interior (distance > max/2) of the larger error region (None when nothing to click)."""
    false_negative, false_positive = error_regions(prediction, target, valid)
    fn_distance = distance_inside(false_negative.cpu().numpy())
    fp_distance = distance_inside(false_positive.cpu().numpy())
    fn_max, fp_max = float(fn_distance.max()), float(fp_distance.max())
    if fn_max == 0.0 and fp_max == 0.0:
        return _confirming_click(target, valid, rng, interior=True)
    positive = fn_max > fp_max  # ties (equal depth) go to the exclude click, like the reference's comparison
    distance, peak = (fn_distance, fn_max) if positive else (fp_distance, fp_max)
    core = torch.from_numpy(distance > peak / 2.0)
    return SimulatedClick(_uniform_voxel(core, rng), int(positive))


def distance_inside(region: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Euclidean distance from each voxel of `region` to the nearest voxel outside it; 0 outside.

    In voxels, or in millimetres when `spacing` (per array axis) is given. The region is padded with one
    outside voxel on every side first, so the crop border counts as outside (the reference's
    `edt(..., black_border=True)` on a padded mask). Exact (Maurer's algorithm).
    """
    import SimpleITK as sitk

    region = np.asarray(region, dtype=bool)
    if not region.any():
        return np.zeros(region.shape, dtype=np.float32)
    padded = np.pad(region, 1).astype(np.uint8)
    # Distances are measured FROM the outside set, so the outside is the "object" for the filter; its
    # positive (outside-the-object) values are then the distances of our region's voxels.
    outside = sitk.GetImageFromArray(1 - padded)
    if spacing is not None:  # array[a, b, c] is SimpleITK index (c, b, a): the spacing goes reversed
        outside.SetSpacing([float(s) for s in reversed(list(spacing))])
    distance = sitk.SignedMaurerDistanceMap(outside, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=spacing is not None)
    values = sitk.GetArrayViewFromImage(distance)[1:-1, 1:-1, 1:-1]
    return np.where(region, values, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------- corner cases
def _confirming_click(target: torch.Tensor, valid: torch.Tensor | None, rng: np.random.Generator,
                      interior: bool) -> SimulatedClick | None:
    """No error left: an include click on the target (its interior for ritm); None for an empty target."""
    region = target.bool() if valid is None else target.bool() & valid.bool()
    if not bool(region.any()):
        return None
    if interior:
        distance = distance_inside(region.cpu().numpy())
        region = torch.from_numpy(distance > float(distance.max()) / 2.0)
    return SimulatedClick(_uniform_voxel(region, rng), 1)


# ------------------------------------------------------------------------------------------- dispatch
def simulate_click(method: ClickMethod, prediction: torch.Tensor, target: torch.Tensor,
                   rng: np.random.Generator, valid: torch.Tensor | None = None) -> SimulatedClick | None:
    """The next click by `method` ("random" or "ritm"); None when the target and prediction are both empty."""
    if method == "random":
        return random_click(prediction, target, rng, valid)
    if method == "ritm":
        return ritm_click(prediction, target, rng, valid)
    raise ValueError(f"unknown click method {method!r}; choose one of {', '.join(CLICK_METHODS)}")


def validation_click_method(click_number: int) -> ClickMethod:
    """The published evaluation protocol: ritm for clicks 1–2, random from click 3 on (1-based)."""
    return "ritm" if click_number <= 2 else "random"


def clicks_to_prompt(clicks: list[SimulatedClick | None], device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of one click per sample → (points (B, 1, 3) float, labels (B, 1) long) for `Sam3D.decode`.

    A sample without a click (None) gets the prompt encoder's "not a point" label −1 at (0, 0, 0), which
    contributes only the learned padding embedding.
    """
    points = torch.zeros((len(clicks), 1, 3), dtype=torch.float32)
    labels = torch.full((len(clicks), 1), -1, dtype=torch.long)
    for index, click in enumerate(clicks):
        if click is not None:
            points[index, 0] = torch.tensor(click.position, dtype=torch.float32)
            labels[index, 0] = click.label
    return points.to(device), labels.to(device)
