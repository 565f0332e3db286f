"""The classical floor: a weight-free, click-seeded segmenter that every learned model must beat.

It is a yardstick for `benchmarks/evaluate_unseen.py`, not a product model. It has the `Predictor`'s
click interface (`set_volume`, `add_click`, `reset_object`; masks are bool arrays on the input grid, ijk)
and works on the volume's own grid, any spacing: every distance below is in millimetres.

Algorithm, recomputed from all of an object's clicks after each click:

1. Region of interest: the box of the clicks grown by `reach_mm` on every axis.
2. Light smoothing (once per volume): a Gaussian of `smoothing_mm` (an axis whose spacing is over twice
   that is not smoothed).
3. An intensity window per include click: the median of the smoothed image in a ball of `sample_mm`
   around the click ± `window_k` × the raw image's robust spread there (1.4826 × MAD), the half-width at
   least `min_window_fraction` of the region's 1–99 % smoothed intensity range. A voxel is
   passable when its smoothed or its raw value (the raw one keeps the object's blurred edge) lies in the
   window of any include click.
4. Growth bounded around the clicks: passable voxels within `reach_mm` (Euclidean, mm) of an include
   click; of these, the 6-connected components that hold an include click.
5. Exclude clicks cut it by geodesic distance: a voxel stays when its shortest path inside the region
   (fast marching, mm) to an include click is shorter than to every exclude click — a geodesic Voronoi
   split, so touching objects of one intensity part where their paths meet. The distances are computed
   on the region sampled every ~`cut_mm` (fast marching dominates the cost) and spread back, so the cut
   is placed to one coarse voxel while the region's own boundary stays at full resolution.
6. Enclosed holes are filled (vessels inside an organ); the mask is pasted into the full grid.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli.errors import BadInputError, UsageError
from fastsam3d_cli.imaging.clickfile import lps_to_ijk, to_lps
from fastsam3d_cli.imaging.volumes import array_ijk, read_image

_MAX_KERNEL_WIDTH = 32  # DiscreteGaussian's kernel width limit (step 2)
_UNREACHED = 1e30  # fast marching leaves voxels it never reached at ~1.8e308; anything above this


@dataclass(frozen=True)
class FloorParameters:
    """The floor's few knobs (defaults chosen on the training datasets, never on data/validation/)."""

    smoothing_mm: float = 1.0
    sample_mm: float = 4.0
    window_k: float = 3.0
    min_window_fraction: float = 0.02
    reach_mm: float = 20.0
    cut_mm: float = 2.0
    fill_holes: bool = True


@dataclass
class _FloorClick:
    index: tuple[int, int, int]  # nearest voxel, ijk of the input grid
    include: bool


class ClassicalSegmenter:
    """Click-seeded region growing with the `Predictor`'s interface (see the module docstring)."""

    name = "classical floor"

    def __init__(self, parameters: FloorParameters | None = None) -> None:
        self.parameters = parameters or FloorParameters()
        self._image: sitk.Image | None = None
        self._values: np.ndarray | None = None  # float32, ijk
        self._smooth: np.ndarray | None = None  # the same, smoothed (step 2, once per volume)
        self._objects: dict[str, list[_FloorClick]] = {}

    # ------------------------------------------------------------------------------ the volume
    def set_volume(self, volume: sitk.Image | str | Path, channel: int | None = None) -> None:
        """Read (if a path) the volume and keep its voxels; clears all objects."""
        if isinstance(volume, (str, Path)):
            volume = read_image(volume, channel, strict_channel=True)
        if not isinstance(volume, sitk.Image) or volume.GetDimension() != 3 or volume.GetNumberOfComponentsPerPixel() != 1:
            raise BadInputError("the volume must be a 3D scalar image", "give a 3D volume (read 4D ones with a channel)")
        self._image = volume
        self._values = array_ijk(volume, np.float32)
        spacing = np.asarray(volume.GetSpacing(), dtype=np.float64)
        self._smooth = smoothed(self._values, spacing, self.parameters.smoothing_mm)
        self._objects.clear()

    @property
    def input_image(self) -> sitk.Image:
        if self._image is None:
            raise UsageError("no volume set", "call set_volume first")
        return self._image

    @property
    def objects(self) -> list[str]:
        return list(self._objects)

    def reset_object(self, object: str | None = None) -> None:  # noqa: A002 - the Predictor's name
        """Forget the clicks of `object` (all objects when None)."""
        if object is None:
            self._objects.clear()
        else:
            self._objects.pop(str(object), None)

    # ------------------------------------------------------------------------------ clicks
    def add_click(self, point: Sequence[float], include: bool = True, space: str = "ijk",
                  object: str = "object") -> np.ndarray:  # noqa: A002
        """Add one click to `object`; return its mask (bool, input grid, ijk). `space`: ijk, ras or lps."""
        image = self.input_image
        if space not in ("ijk", "ras", "lps"):
            raise UsageError(f"unknown click space '{space}'", "use ras, lps or ijk")
        position = lps_to_ijk(to_lps([point], space, image), image)[0]
        if not np.all(np.isfinite(position)):
            raise BadInputError(f"click {list(point)} is not a finite position", "give three finite numbers")
        index = np.rint(position).astype(int)
        size = np.asarray(image.GetSize())
        if np.any(index < 0) or np.any(index >= size):
            raise BadInputError(f"click {list(point)} ({space}) lies outside the volume (voxel {index.tolist()}, "
                                f"size {size.tolist()})", "click inside the volume")
        self._objects.setdefault(str(object), []).append(_FloorClick(tuple(int(v) for v in index), bool(include)))
        return self.mask(str(object))

    def mask(self, object: str = "object") -> np.ndarray:  # noqa: A002
        """The object's mask from all its clicks (bool, input grid, ijk)."""
        image, values = self.input_image, self._values
        assert values is not None
        clicks = self._objects.get(str(object), [])
        includes = [c.index for c in clicks if c.include]
        spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
        assert self._smooth is not None
        return segment_clicks(values, self._smooth, spacing, includes,
                              [c.index for c in clicks if not c.include], self.parameters)


# ------------------------------------------------------------------------------------ the algorithm
def segment_clicks(values: np.ndarray, smooth: np.ndarray, spacing: Sequence[float],
                   includes: Sequence[tuple[int, int, int]], excludes: Sequence[tuple[int, int, int]],
                   parameters: FloorParameters | None = None) -> np.ndarray:
    """The floor's mask (bool, the shape of `values`) for these clicks (voxel indices of `values`).

    Steps 1 and 3–6 of the module docstring: only the box of the clicks grown by `reach_mm` is computed
    (`smooth` is `values` smoothed by step 2). Used by `ClassicalSegmenter` on the input grid and by the
    classical prior (`interactive.prior`) on a model crop."""
    p = parameters or FloorParameters()
    out = np.zeros(values.shape, dtype=bool)
    if not includes:
        return out
    spacing = np.asarray(spacing, dtype=np.float64)
    roi = click_roi(list(includes) + list(excludes), values.shape, spacing, p.reach_mm)
    lo = [s.start for s in roi]
    shift = [tuple(int(v) for v in np.subtract(i, lo)) for i in includes]
    out[roi] = segment_region(values[roi], smooth[roi], spacing, shift,
                              [tuple(int(v) for v in np.subtract(c, lo)) for c in excludes], p)
    return out


def click_roi(clicks: Sequence[tuple[int, int, int]], shape: Sequence[int], spacing: Sequence[float],
              reach_mm: float) -> tuple[slice, ...]:
    """Step 1: the box of the clicks grown by `reach_mm` (+1 voxel), clipped to `shape`: all that
    `segment_clicks` reads of its arrays."""
    margin = np.ceil(reach_mm / np.asarray(spacing, dtype=np.float64)).astype(int) + 1
    points = np.asarray(clicks, dtype=int).reshape(-1, 3)
    lo = np.maximum(points.min(axis=0) - margin, 0)
    hi = np.minimum(points.max(axis=0) + margin + 1, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def segment_region(values: np.ndarray, smooth: np.ndarray, spacing: Sequence[float],
                   includes: Sequence[tuple[int, int, int]], excludes: Sequence[tuple[int, int, int]],
                   parameters: FloorParameters | None = None) -> np.ndarray:
    """Steps 3–6 of the module docstring on one ijk block (raw and smoothed values, `spacing` in mm);
    clicks are block indices."""
    p = parameters or FloorParameters()
    spacing = np.asarray(spacing, dtype=np.float64)
    finite = smooth[np.isfinite(smooth)]
    low, high = np.percentile(finite, [1.0, 99.0]) if finite.size else (0.0, 0.0)
    span = max(float(high - low), 1e-6)
    passable = np.zeros(values.shape, dtype=bool)
    for click in includes:
        centre, spread = click_statistics(smooth, values, spacing, click, p.sample_mm)
        half = max(p.window_k * spread, p.min_window_fraction * span)
        passable |= (np.abs(smooth - centre) <= half) | (np.abs(values - centre) <= half)
    passable &= _near(values.shape, spacing, includes, p.reach_mm)
    for click in includes:
        passable[click] = True  # a seed always starts its own region
    for click in excludes:
        passable[click] = False
    region = components_holding(passable, includes)
    if excludes and region.any():
        region &= _closer_to_includes(region, spacing, includes, excludes, p.cut_mm)
        region = components_holding(region, includes)
    if p.fill_holes and region.any():
        region = _fill_holes(region)
        for click in excludes:  # filling never brings an exclude click back
            region[click] = False
    return region


def _near(shape: tuple[int, ...], spacing: np.ndarray, clicks: Sequence[tuple[int, int, int]],
          radius_mm: float) -> np.ndarray:
    """Voxels within `radius_mm` (Euclidean, mm) of any click: growth stays around the clicks."""
    near = np.zeros(shape, dtype=bool)
    reach = np.ceil(radius_mm / spacing).astype(int)
    for click in clicks:
        box, ball = _ball(click, reach, shape, spacing, radius_mm)
        near[box] |= ball
    return near


def _ball(centre: tuple[int, int, int], reach: np.ndarray, shape: Sequence[int], spacing: np.ndarray,
          radius_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """(box of ±`reach` voxels around `centre` clipped to `shape`, its voxels within `radius_mm` of the centre)."""
    lo = np.maximum(np.asarray(centre) - reach, 0)
    hi = np.minimum(np.asarray(centre) + reach + 1, shape)
    axes = [((np.arange(a, b) - c) * s) ** 2 for a, b, c, s in zip(lo, hi, centre, spacing)]
    ball = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :] <= radius_mm ** 2
    return tuple(slice(a, b) for a, b in zip(lo, hi)), ball


def components_holding(mask: np.ndarray, seeds: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """The 6-connected components of `mask` that hold a seed."""
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(_as_image(mask.astype(np.uint8)), False))
    kept = {int(labels[seed]) for seed in seeds} - {0}
    return np.isin(labels, sorted(kept)) if kept else np.zeros(mask.shape, dtype=bool)


def _closer_to_includes(region: np.ndarray, spacing: np.ndarray, includes: Sequence[tuple[int, int, int]],
                        excludes: Sequence[tuple[int, int, int]], cut_mm: float) -> np.ndarray:
    """Voxels geodesically (through `region`) closer to an include click than to every exclude click.

    Computed on the block sampled every ~`cut_mm` (fast marching is the floor's cost) and spread back by
    repetition: the cut is placed to within one coarse voxel, the region's own boundary stays full resolution.
    """
    step = np.maximum(1, np.floor(cut_mm / spacing + 1e-9)).astype(int)
    coarse = region[::step[0], ::step[1], ::step[2]].copy()
    inc = [tuple(int(v) for v in np.asarray(c) // step) for c in includes]
    exc = [tuple(int(v) for v in np.asarray(c) // step) for c in excludes]
    for click in inc + exc:
        coarse[click] = True
    to_include = geodesic_distance(coarse, spacing * step, inc)
    to_exclude = geodesic_distance(coarse, spacing * step, exc)
    closer = to_include < to_exclude
    for click in exc:
        closer[click] = False
    for click in inc:
        closer[click] = True
    up = closer.repeat(step[0], 0).repeat(step[1], 1).repeat(step[2], 2)
    return up[:region.shape[0], :region.shape[1], :region.shape[2]]


def smoothed(values: np.ndarray, spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Gaussian smoothing of an ijk block in mm; axes whose spacing exceeds 2σ are left alone."""
    variance = [float(sigma_mm) ** 2 if s <= 2.0 * sigma_mm else 0.0 for s in spacing]
    if sigma_mm <= 0 or not any(variance):
        return values.astype(np.float32, copy=False)
    image = _as_image(values.astype(np.float32, copy=False), spacing)
    # the image's axes are the array's reversed (`_as_image`), so the per-axis variance is given reversed too
    result = sitk.DiscreteGaussian(image, variance[::-1], _MAX_KERNEL_WIDTH, 0.01, True)  # exact σ, 0 allowed
    return sitk.GetArrayFromImage(result)


@functools.lru_cache(maxsize=16)
def smoothing_radius(spacing: tuple[float, float, float], sigma_mm: float) -> tuple[int, int, int]:
    """How far (voxels, per axis) one voxel's value reaches under `smoothed`: the support of its impulse
    response. Smoothing a block padded by this much gives the block exactly (bit for bit) what smoothing the
    whole array gives it (interactive/prior.py smooths only the box its clicks read)."""
    size = 2 * _MAX_KERNEL_WIDTH + 1
    impulse = np.zeros((size, size, size), np.float32)
    impulse[(_MAX_KERNEL_WIDTH,) * 3] = 1.0
    support = np.nonzero(smoothed(impulse, np.asarray(spacing, dtype=np.float64), sigma_mm))
    return tuple(int(np.abs(axis - _MAX_KERNEL_WIDTH).max()) for axis in support)  # type: ignore[return-value]


def click_statistics(smooth: np.ndarray, raw: np.ndarray, spacing: np.ndarray, click: tuple[int, int, int],
                      radius_mm: float) -> tuple[float, float]:
    """(median of the smoothed values, 1.4826 × MAD of the raw values) within `radius_mm` of the click.

    The spread is the raw image's (noise and texture as acquired): the window then also admits the
    smoothed, partial-volume voxels along the object's edge.
    """
    box, ball = _ball(click, np.floor(radius_mm / spacing).astype(int), smooth.shape, spacing, radius_mm)
    smooth_samples, raw_samples = smooth[box][ball], raw[box][ball].astype(np.float64)
    keep = np.isfinite(smooth_samples) & np.isfinite(raw_samples)
    if not keep.any():
        return float(smooth[click]), 0.0
    centre = float(np.median(smooth_samples[keep]))
    raw_samples = raw_samples[keep]
    return centre, float(1.4826 * np.median(np.abs(raw_samples - np.median(raw_samples))))


def geodesic_distance(passable: np.ndarray, spacing: np.ndarray, seeds: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Fast-marching distance (mm) from `seeds` through `passable` voxels; np.inf where unreachable."""
    speed = _as_image(passable.astype(np.float32), spacing)
    marcher = sitk.FastMarchingImageFilter()
    marcher.SetTrialPoints([tuple(int(v) for v in reversed(seed)) for seed in seeds])  # SimpleITK index order
    arrival = sitk.GetArrayFromImage(marcher.Execute(speed))
    return np.where(arrival > _UNREACHED, np.inf, arrival)


def _fill_holes(region: np.ndarray) -> np.ndarray:
    """Fill enclosed cavities (on the region's bounding box plus one voxel: the outside stays connected)."""
    hit = [np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    box = tuple(slice(max(int(h[0]) - 1, 0), int(h[-1]) + 2) for h in hit)
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(_as_image(region[box].astype(np.uint8)), True, 1))
    out = region.copy()
    out[box] |= filled.astype(bool)
    return out


def _as_image(array: np.ndarray, spacing: Sequence[float] | None = None) -> sitk.Image:
    """A SimpleITK image of an array WITHOUT transposing it (no copy for a C-contiguous array).

    SimpleITK reads array[a, b, c] as index (c, b, a), so the spacing is given reversed; distances and
    connectivity do not depend on the axis order. Arrays read back with GetArrayFromImage keep the order.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if spacing is not None:
        image.SetSpacing([float(v) for v in reversed(list(spacing))])
    return image
