"""The classical prior: the floor's region, computed on the model's own crop, as a logit map the model corrects.

A model trained with a prior (`fastsam3d train --prior classical`) does not predict the mask on its own. At
every click, on the 128³ crop it sees (1.5 mm, the same voxels it encodes):

1. the classical floor (`interactive.classical.segment_clicks`, its default settings) is run from all the
   object's clicks inside the crop, giving the prior logits P = +scale inside its region, −scale outside;
2. the decoder's mask prompt is avgpool(P) + the crop's previous *residual* low-res logits R (zeros before
   the first click), so the model sees where the floor's region is and what it has corrected so far;
3. the decoder's 32³ output M becomes the new residual R = gate × M, and the crop's logits are
   P + upsample(R): the mask is the floor's region where the model adds nothing, and the model's
   correction where it is confident enough to override it.

`gate` is a learned scalar (trained with the model, stored beside its weights under the checkpoint's
"prior" entry). A new training run zeroes the last layer of the decoder's mask hypernetwork
(`zero_residual`), so that M = 0 and the model begins exactly as the floor; that layer still gets gradients
(the decoder's features are not zero), so the correction grows from the first step — the usual start of a
residual branch. (A first try kept the hypernetwork and scaled M by a gate of 0.1 instead: after 325 steps
the gate and the masks had not moved, since M had to grow 40-fold to override the prior.) The same code runs in training (`training.train.interactive_loss`) and at
inference (`interactive.predictor.Predictor`), so what was trained is what runs.

A model with a refine head (`fastsam3d-tiny-refine`, model/refine_head.py) replaces P by the head's
full-resolution correction of the floor's region on the clicks' box (interactive/refine.py) before step 2; the
rest is unchanged. `fastsam3d train --refine-head` trains that head alone (training/refine_train.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fastsam3d_cli.errors import UsageError, WeightsError
from fastsam3d_cli.interactive.classical import (FloorParameters, click_roi, segment_clicks, smoothed,
                                                 smoothing_radius)
from fastsam3d_cli.interactive.refine import box_around, refined_logits

PRIOR_KINDS = ("none", "classical")
DEFAULT_SCALE = 4.0  # |logit| of the prior: sigmoid(4) = 0.98, so a confident correction can override it
DEFAULT_GATE = 1.0  # the residual's weight (learned); a new run starts the residual itself at 0 (`zero_residual`)


@dataclass(frozen=True)
class PriorSettings:
    """How a model combines its output with the classical prior (stored in checkpoints as "prior")."""

    kind: str = "classical"
    scale: float = DEFAULT_SCALE
    gate: float = DEFAULT_GATE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any, source: str = "the checkpoint") -> "PriorSettings | None":
        """Settings from a checkpoint's "prior" entry; None when there is none (a plain model).

        WeightsError (exit 4) for an entry this version cannot run (a newer tool's prior, a broken file)."""
        if value is None:
            return None
        if not isinstance(value, Mapping) or value.get("kind") not in PRIOR_KINDS[1:]:
            raise WeightsError(f"{source} asks for a prior this version does not know ({value!r:.80})",
                               "update fastsam3d, or use a checkpoint without a prior")
        try:
            settings = cls(str(value["kind"]), float(value.get("scale", DEFAULT_SCALE)),
                           float(value.get("gate", DEFAULT_GATE)))
        except (TypeError, ValueError, KeyError) as exc:
            raise WeightsError(f"{source} has a malformed prior entry ({exc})",
                               "re-export the checkpoint with this version of fastsam3d") from None
        if not (np.isfinite(settings.scale) and settings.scale > 0 and np.isfinite(settings.gate)):
            raise WeightsError(f"{source} has a malformed prior entry (scale {settings.scale}, gate {settings.gate})",
                               "re-export the checkpoint with this version of fastsam3d")
        return settings


def check_kind(kind: str) -> str:
    """The --prior value, or UsageError (exit 2) naming the choices."""
    if kind not in PRIOR_KINDS:
        raise UsageError(f"--prior '{kind}' is unknown", f"use one of: {', '.join(PRIOR_KINDS)}")
    return kind


class CropPrior:
    """The prior on one crop: its voxels, their smoothed copy, and the floor's region for a set of clicks.

    The floor and the refine head read the smoothed copy only on the clicks' box (`needed_box`), so `region`
    and `logits` smooth just that box (padded by the smoothing's reach, so its values are bit for bit those of
    the whole crop smoothed): for the README example's liver, about a quarter of the cost."""

    def __init__(self, crop: np.ndarray, spacing_mm: float, parameters: FloorParameters | None = None) -> None:
        self.parameters = parameters or FloorParameters()
        self.values = np.asarray(crop, dtype=np.float32)
        self.spacing = np.full(3, float(spacing_mm))
        self._smooth: np.ndarray | None = None  # exact inside the boxes of `_smoothed_boxes`, NaN elsewhere
        self._smoothed_boxes: list[tuple[slice, ...]] = []
        self._whole = False

    @property
    def smooth(self) -> np.ndarray:
        """The whole crop smoothed (step 2 of interactive/classical.py), computed on first use."""
        if not self._whole:
            self._smooth = smoothed(self.values, self.spacing, self.parameters.smoothing_mm)
            self._whole = True
        assert self._smooth is not None
        return self._smooth

    def smooth_covering(self, box: tuple[slice, ...]) -> np.ndarray:
        """A crop-shaped array equal to `smooth` inside `box` (computed there now if needed; NaN where nothing
        was computed yet)."""
        if self._whole or any(_contains(done, box) for done in self._smoothed_boxes):
            assert self._smooth is not None
            return self._smooth
        reach = smoothing_radius(tuple(float(v) for v in self.spacing), float(self.parameters.smoothing_mm))
        padded = tuple(slice(max(s.start - r - 1, 0), min(s.stop + r + 1, n))
                       for s, r, n in zip(box, reach, self.values.shape))
        block = smoothed(self.values[padded], self.spacing, self.parameters.smoothing_mm)
        if self._smooth is None:
            self._smooth = np.full(self.values.shape, np.nan, np.float32)
        self._smooth[box] = block[tuple(slice(s.start - p.start, s.stop - p.start) for s, p in zip(box, padded))]
        self._smoothed_boxes.append(box)
        return self._smooth

    def needed_box(self, voxels: Sequence[tuple[tuple[int, int, int], bool]], refine: bool) -> tuple[slice, ...]:
        """The box of the smoothed copy that the floor (and, with `refine`, the refine head) reads for these
        (voxel, include) clicks: the floor's region of interest, joined with the refine head's box."""
        points = [v for v, _ in voxels]
        box = click_roi(points, self.values.shape, self.spacing, self.parameters.reach_mm)
        if refine:
            head_box = box_around(points, self.values.shape, float(self.spacing[0]))
            box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box, head_box))
        return box

    def voxels(self, clicks: Sequence[tuple[Sequence[float], bool]]) -> list[tuple[tuple[int, int, int], bool]]:
        """(nearest voxel, include) of the (crop index, include) clicks inside the crop; the others are dropped."""
        shape = np.asarray(self.values.shape)
        kept = []
        for index, include in clicks:
            voxel = np.rint(np.asarray(index, dtype=np.float64)).astype(int)
            if np.any(voxel < 0) or np.any(voxel >= shape):
                continue
            kept.append((tuple(int(v) for v in voxel), bool(include)))
        return kept

    def region(self, clicks: Sequence[tuple[Sequence[float], bool]]) -> np.ndarray:
        """The floor's region (bool, crop shape) from (crop index, include) clicks; those outside are ignored."""
        voxels = self.voxels(clicks)
        return self._floor(voxels, self._smooth_for(voxels, refine=False))

    def logits(self, clicks: Sequence[tuple[Sequence[float], bool]], scale: float, refine_head: Any = None) -> np.ndarray:
        """The prior's logits (float32, crop shape): ±scale of `region(clicks)`, or, for a model with a refine
        head, that region as the head corrects it (interactive/refine.py)."""
        voxels = self.voxels(clicks)
        smooth = self._smooth_for(voxels, refine=refine_head is not None)
        region = self._floor(voxels, smooth)
        if refine_head is None or smooth is None:  # (the head needs an include click)
            return np.where(region, np.float32(scale), np.float32(-scale))
        return refined_logits(refine_head, self.values, smooth, region, voxels, float(self.spacing[0]), scale,
                              self.parameters)

    def _smooth_for(self, voxels: Sequence[tuple[tuple[int, int, int], bool]], refine: bool) -> np.ndarray | None:
        """The smoothed copy, valid on all these clicks make the floor (and the head) read; None without an include
        click (then nothing is read)."""
        if not any(include for _, include in voxels):
            return None
        return self.smooth_covering(self.needed_box(voxels, refine))

    def _floor(self, voxels: Sequence[tuple[tuple[int, int, int], bool]], smooth: np.ndarray | None) -> np.ndarray:
        if smooth is None:
            return np.zeros(self.values.shape, dtype=bool)
        includes = [v for v, include in voxels if include]
        excludes = [v for v, include in voxels if not include]
        return segment_clicks(self.values, smooth, self.spacing, includes, excludes, self.parameters)


def _contains(outer: tuple[slice, ...], inner: tuple[slice, ...]) -> bool:
    return all(o.start <= i.start and i.stop <= o.stop for o, i in zip(outer, inner))


def zero_residual(model: Any) -> None:
    """Zero the last layer of mask token 0's hypernetwork MLP: the model's output M starts at exactly 0."""
    import torch

    layer = model.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()


def residual_is_zero(model: Any) -> bool:
    """True when the decoder's output M is exactly 0 for every input: the last layer of mask token 0's
    hypernetwork is all zeros (a new prior run's start, kept by `train --refine-head`), so hyper_in = 0."""
    try:
        layer = model.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    except (AttributeError, IndexError, TypeError):
        return False
    return not bool(layer.weight.detach().any()) and not bool(layer.bias.detach().any())


def decode_step(model: Any, embedding: Any, points: Any, labels: Any, prior_logits: Any, residual: Any,
                gate: Any, prompt: Any = None) -> tuple[Any, Any]:
    """One decoder step of a prior model, the same in `train`, `validate` and the `Predictor`.

    prior_logits: (B, 1, S, S, S) ±scale; residual: the previous step's gate × M at low resolution (None before
    the first step). `prompt`: a mask prompt to use instead of avgpool(P) + residual (a new crop of the
    `Predictor` is prompted with the merged logits so far). Returns (the new residual gate × M, the logits
    P + upsample(gate × M))."""
    if prompt is None:
        prompt = mask_prompt(prior_logits, residual, model.config.low_res_size)
    output, _ = model.decode(embedding, points, labels, prompt.to(embedding.dtype))
    residual = gate * output.float()
    return residual, prior_logits + model.upsample_logits(residual)


def mask_prompt(prior_logits: Any, residual_low_res: Any, low_res_size: int) -> Any:
    """The decoder's mask prompt: avgpool(P) to the low-res grid plus the residual so far (torch tensors)."""
    import torch.nn.functional as F

    factor = prior_logits.shape[-1] // low_res_size
    pooled = F.avg_pool3d(prior_logits, kernel_size=factor, stride=factor)
    return pooled if residual_low_res is None else pooled + residual_low_res
