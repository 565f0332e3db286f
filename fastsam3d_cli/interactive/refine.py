"""The refine head's input and output on one crop: what a prior model with a refine head runs at each click.

On the crop the model sees (1.5 mm), after the classical floor's region is known:

1. the box: the clicks' bounding box grown by `MARGIN_MM` (twice the floor's reach), clipped to the crop,
   each side a multiple of 4 where the crop allows (the head downsamples twice);
2. the features (`features`): the crop's values and their smoothed copy, each as (v − c) / h clipped to ±6
   and divided by 3, where c and h are the medians over the include clicks of the floor's own window
   (centre, half-width) — click-relative, so the same numbers mean the same thing on CT and on MR; the
   floor's region; exp(−d / 15 mm) of the distance d to the nearest include and to the nearest exclude click;
3. the head's logits on the box (model/refine_head.py); outside the box the crop is background;
4. like the floor: click voxels are forced to their side, and only the components holding an include click
   are kept. The result is returned as logits whose sign is that decision and whose size is the head's
   confidence (at least `MIN_LOGIT`), so the SAM decoder's residual is added to it as to the plain prior.

Training (training/refine_train.py) calls the same `box_around` and `features`, so what was trained runs.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fastsam3d_cli.interactive.classical import FloorParameters, click_statistics, components_holding

MARGIN_MM = 40.0
PROXIMITY_MM = 15.0
CLIP = 6.0
MIN_LOGIT = 0.01

Voxel = tuple[int, int, int]


def box_around(clicks: Sequence[Voxel], shape: Sequence[int], spacing_mm: float,
               margin_mm: float = MARGIN_MM) -> tuple[slice, ...]:
    """The clicks' box grown by `margin_mm`, clipped to `shape`, each side a multiple of 4 where it fits."""
    points = np.asarray(clicks, dtype=int).reshape(-1, 3)
    margin = int(np.ceil(margin_mm / spacing_mm))
    lo = np.maximum(points.min(0) - margin, 0)
    hi = np.minimum(points.max(0) + margin + 1, shape)
    box = []
    for a, b, n in zip(lo, hi, shape):
        size = int(b - a)
        want = min(int(np.ceil(size / 4) * 4), int(n) // 4 * 4) if n >= 4 else int(n)
        stop = min(int(a) + want, int(n))
        box.append(slice(max(stop - want, 0), stop))
    return tuple(box)


def click_window(values: np.ndarray, smooth: np.ndarray, spacing_mm: float, includes: Sequence[Voxel],
                 box: tuple[slice, ...], parameters: FloorParameters) -> tuple[float, float]:
    """(centre, half-width): the medians over the include clicks of the floor's intensity window."""
    spacing = np.full(3, float(spacing_mm))
    low, high = np.percentile(smooth[box], [1.0, 99.0])
    span = max(float(high - low), 1e-6)
    centres, halves = [], []
    for click in includes:
        centre, spread = click_statistics(smooth, values, spacing, click, parameters.sample_mm)
        centres.append(centre)
        halves.append(max(parameters.window_k * spread, parameters.min_window_fraction * span))
    return float(np.median(centres)), max(float(np.median(halves)), 1e-6)


def proximity(clicks: Sequence[Voxel], box: tuple[slice, ...], spacing_mm: float) -> np.ndarray:
    """exp(−d / PROXIMITY_MM) of the distance d (mm) to the nearest click, on the box (zeros: no click)."""
    shape = tuple(s.stop - s.start for s in box)
    if not clicks:
        return np.zeros(shape, np.float32)
    nearest = np.full(shape, np.inf, np.float32)
    for click in clicks:
        axes = [((np.arange(s.start, s.stop, dtype=np.float32) - c) * spacing_mm) ** 2 for s, c in zip(box, click)]
        squared = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
        np.minimum(nearest, squared, out=nearest)
    return np.exp(-np.sqrt(nearest) / PROXIMITY_MM).astype(np.float32)


def features(values: np.ndarray, smooth: np.ndarray, region: np.ndarray, includes: Sequence[Voxel],
             excludes: Sequence[Voxel], box: tuple[slice, ...], spacing_mm: float,
             parameters: FloorParameters | None = None) -> np.ndarray:
    """(5, *box shape) float32: the refine head's input (see the module docstring). Needs an include click."""
    parameters = parameters or FloorParameters()
    centre, half = click_window(values, smooth, spacing_mm, includes, box, parameters)
    shape = tuple(s.stop - s.start for s in box)
    out = np.empty((5, *shape), np.float32)
    out[0] = np.clip((values[box] - centre) / half, -CLIP, CLIP) / (CLIP / 2)
    out[1] = np.clip((smooth[box] - centre) / half, -CLIP, CLIP) / (CLIP / 2)
    out[2] = region[box]
    out[3] = proximity(includes, box, spacing_mm)
    out[4] = proximity(excludes, box, spacing_mm)
    return out


def refined_logits(head: Any, values: np.ndarray, smooth: np.ndarray, region: np.ndarray,
                   clicks: Sequence[tuple[Voxel, bool]], spacing_mm: float, scale: float,
                   parameters: FloorParameters | None = None) -> np.ndarray:
    """Crop-shaped float32 logits: the head's correction of the floor's `region` (steps 1–4 above).

    Without an include click the floor's ±scale logits are returned unchanged (nothing to be relative to)."""
    import torch

    includes = [c for c, include in clicks if include]
    excludes = [c for c, include in clicks if not include]
    if not includes:
        return np.where(region, np.float32(scale), np.float32(-scale))
    box = box_around([c for c, _ in clicks], values.shape, spacing_mm)
    x = torch.from_numpy(features(values, smooth, region, includes, excludes, box, spacing_mm, parameters))
    parameter = next(head.parameters())
    x = x[None].to(device=parameter.device, dtype=parameter.dtype)
    if parameter.dim() == 5 and parameter.is_contiguous(memory_format=torch.channels_last_3d):
        x = x.contiguous(memory_format=torch.channels_last_3d)  # a head loaded for inference on CPU (weights/loading.py)
    with torch.inference_mode():
        inside = head(x)[0, 0].float().cpu().numpy()
    logits = np.full(values.shape, np.float32(-scale))
    if all(_inside(click, box) for click in includes + excludes):  # always, unless a box was cut short
        # step 4 on the box alone (the same result: outside it nothing is decided, so no component leaves it)
        logits[box] = _decide(inside, _local(includes, box), _local(excludes, box))
        return logits
    logits[box] = inside
    return _decide(logits, includes, excludes)


def _decide(logits: np.ndarray, includes: Sequence[Voxel], excludes: Sequence[Voxel]) -> np.ndarray:
    """Step 4: the sign of `logits` with the clicks forced to their side and only the components holding an
    include click kept; the size is the confidence, at least `MIN_LOGIT`."""
    decided = logits > 0
    for click in includes:
        decided[click] = True
    for click in excludes:
        decided[click] = False
    decided = components_holding(decided, includes)
    magnitude = np.maximum(np.abs(logits), np.float32(MIN_LOGIT))
    return np.where(decided, magnitude, -magnitude).astype(np.float32)


def _inside(click: Voxel, box: tuple[slice, ...]) -> bool:
    return all(s.start <= c < s.stop for c, s in zip(click, box))


def _local(clicks: Sequence[Voxel], box: tuple[slice, ...]) -> list[Voxel]:
    return [tuple(int(c) - s.start for c, s in zip(click, box)) for click in clicks]  # type: ignore[misc]
