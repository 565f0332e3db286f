"""Interactive segmentation session: set a volume once, add clicks one by one, get the mask after each.

    predictor = Predictor.from_checkpoint("FastSAM3D.pth")          # or Predictor(model)
    predictor.set_volume("ct.nii.gz")
    mask = predictor.add_click([-42.0, 18.5, 101.0], space="ras", object="liver")   # bool, input grid, ijk
    mask = predictor.add_click([-60.2, 10.0, 95.5], include=False, space="ras", object="liver")

What happens (reference/models.md §3; the order matters):

1. `set_volume`: read → canonical RAS+ orientation (`imaging.to_canonical`) → the 1.5 mm *canonical grid*
   (`imaging.resampled_grid`). Every crop is cut from this grid; its array axes (ijk) are the model's
   crop-tensor axes. Only the crops are resampled (linear, from the reoriented volume, onto exactly the
   grid's voxels; zero outside the grid) — the same values as resampling the whole volume first, for a
   fraction of the work.
2. The first click of an object fixes its *primary* 128³ crop, centred on the click (`add_clicks`: on the
   bounding box of all its clicks). The crop is zero-padded outside the volume and z-normalised over its
   voxels > 0, then encoded ONCE; embeddings are cached per crop.
3. Each click is one decoder step with only the NEW point plus the crop's previous 32³ low-res logits (a
   zero tensor on the first click) — how the models were trained and evaluated. The 32³ logits are
   upsampled to 128³ (trilinear) and thresholded at 0 (probability 0.5).
4. Crop extension (objects larger than one crop): when a crop's mask touches one of its faces where the
   volume continues, a neighbour crop shifted by `extension_step` voxels (64 = half a crop) is added and
   decoded with the clicks that fall inside it (≥ 16 voxels from its faces) — or, if none does, one
   synthesised include click at the most confident mask voxel of the region it shares with its parent
   (preferably ≥ 16 voxels inside it) — plus the mask so far as the low-res prompt. This
   repeats from the new crops up to `max_crops` crops per object. All crops lie on one lattice (primary
   start + multiples of the step). A click outside every crop gets its own lattice crop (at max_crops it
   replaces the newest extension crop nobody clicked in).
   Merge (`crop_canvas.CropCanvas`): each voxel takes the logits of the covering crop whose centre is
   nearest (Chebyshev distance, ties broken by Euclidean distance), i.e. the crop in which the voxel lies
   deepest — so no voxel is predicted near a crop border when another crop sees it from further inside.
   Further clicks: a click is one decoder step in the primary/click crops containing it and in the crop
   shown at its voxel — an extension crop is corrected by clicking where it is shown; the other crops
   keep their prediction. An extension crop (unless it holds a click) is dropped, with the crops grown from it,
   when its parent is re-decoded and no longer touches their shared face; new extensions grow where a
   mask now reaches an open face. The merged canvas is updated only where re-decoded crops are shown.
   So a further click costs one or two decoder steps whatever the number of crops.
5. The merged logits are pasted back onto the input grid through the crops' physical geometry with
   nearest-neighbour resampling (`mask`), or as sigmoid probabilities with linear resampling
   (`probabilities`).

Two variations. A model trained with `--prior classical` (its checkpoint's "prior" entry) adds the classical
floor's region on each crop to its decoder output at every step (`interactive/prior.py`). An object started
with `set_mask` is that mask until clicked; its first crop gets the mask as its low-res prompt, and wherever
no crop of it reaches, the mask stays as given.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli.imaging.clickfile import ClickObject, check_inside, lps_to_ijk, to_lps
from fastsam3d_cli.imaging.world import IMAGE_GEOMETRY, WorldGeometry, geometry_from_metadata, world_geometry
from fastsam3d_cli.interactive.crop_canvas import CropCanvas, shown_box
from fastsam3d_cli.interactive.prior import CropPrior, PriorSettings, decode_step, residual_is_zero
from fastsam3d_cli.imaging.crops import MODEL_SPACING_MM, CropBox, box_centered_on, extract_crop, znormalize_foreground
from fastsam3d_cli.errors import BadInputError, UsageError
from fastsam3d_cli.imaging.volumes import (affine_lps, read_image, resample_onto, resample_to_spacing,
                                   resampled_grid, to_canonical)

DEFAULT_MAX_CROPS = 8
UNCOVERED_LOGIT = -100.0  # logit pasted where no crop predicted anything (probability ~0)
INITIAL_LOGIT = 10.0  # |logit| of a starting mask (`set_mask`) on the input grid and in its crops' first prompt
SYNTHETIC_CLICK_MARGIN = 16  # a synthesised click stays this many voxels inside its crop


@dataclass(frozen=True)
class CanonicalGrid:
    """Geometry of the canonical 1.5 mm grid (no voxel data), with SimpleITK-style accessors."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    direction: tuple[float, ...]  # row-major 3×3, LPS

    def GetSize(self) -> tuple[int, int, int]:  # noqa: N802 - SimpleITK naming on purpose
        return self.size

    def GetSpacing(self) -> tuple[float, float, float]:  # noqa: N802
        return self.spacing

    def GetOrigin(self) -> tuple[float, float, float]:  # noqa: N802
        return self.origin

    def GetDirection(self) -> tuple[float, ...]:  # noqa: N802
        return self.direction

    def TransformIndexToPhysicalPoint(self, index: Sequence[float]) -> tuple[float, float, float]:  # noqa: N802
        affine = affine_lps(self)  # type: ignore[arg-type]
        return tuple(float(v) for v in affine[:3, :3] @ np.asarray(index, dtype=np.float64) + affine[:3, 3])  # type: ignore[return-value]


@dataclass
class Click:
    """One click: world position, include/exclude, and its position in the canonical grid."""

    lps: np.ndarray  # (3,) millimetres
    include: bool
    index: np.ndarray  # (3,) continuous voxel index in the canonical 1.5 mm grid


@dataclass
class CropRun:
    """One 128³ crop of an object and its decoder state."""

    box: CropBox  # in canonical-grid voxel indices
    kind: str  # "primary" | "click" (made for a click outside the other crops) | "extension"
    low_res: Any = None  # (1, 1, 32, 32, 32) torch logits of the last decoder step (the next prompt)
    # ^ with a prior: the residual gate × M of the last step; a crop's transferred prompt is used as it is once
    transferred: bool = False  # low_res is the merged logits handed to a new crop (`_transfer_prompt`)
    logits: np.ndarray | None = None  # (128, 128, 128) float32 upsampled logits, axes = canonical ijk
    clicks: list[int] = field(default_factory=list)  # 0-based indices of the object's clicks applied here
    synthetic_click: np.ndarray | None = None  # canonical index of a synthesised include click, if any
    parent: CropBox | None = None  # extension: the crop whose mask touched the shared face ...
    face: tuple[int, int] | None = None  # ... and that face, (axis, side ±1), seen from the parent
    version: int = 0  # bumped by every decoder step (the merged canvas re-copies changed crops only)


@dataclass
class ObjectState:
    """Clicks and crops of one object."""

    name: str
    clicks: list[Click] = field(default_factory=list)
    crops: list[CropRun] = field(default_factory=list)
    canvas: CropCanvas | None = field(default=None, repr=False)  # merged logits, see `Predictor._merged`
    # a starting mask (`set_mask`): (start ijk, ±INITIAL_LOGIT logits over its bounding box) on the input grid
    initial: tuple[tuple[int, int, int], np.ndarray] | None = field(default=None, repr=False)


class Predictor:
    """Interactive session over one volume (see the module docstring for the pipeline).

    model: a `Sam3D` (or anything with the same `encode` / `decode` / `upsample_logits`), in eval mode.
    device: where crops are sent (default: the model's device).
    max_crops: crops per object (1 turns crop extension off).
    """

    def __init__(self, model: Any, device: Any = None, *, spacing_mm: float = MODEL_SPACING_MM,
                 max_crops: int = DEFAULT_MAX_CROPS, extension_step: int | None = None) -> None:
        import torch

        if int(max_crops) < 1:
            raise UsageError(f"--max-crops {max_crops} is invalid", "use 1 or more (1 turns crop extension off)")
        self.model = model
        self.device = torch.device(device) if device is not None else _model_device(model)
        from fastsam3d_cli.model.cpu_runtime import tune_cpu_for_inference

        tune_cpu_for_inference(self.device)  # an injected model may not come from build_model/load_model
        config = getattr(model, "config", None)
        self.crop_size = int(config.image_size) if config is not None else 128
        self.low_res_size = int(config.low_res_size) if config is not None else self.crop_size // 4
        self.spacing_mm = float(spacing_mm)
        self.max_crops = int(max_crops)
        self.extension_step = int(extension_step or self.crop_size // 2)
        self.timings: list[dict[str, Any]] = []  # one record per stage run: {"stage", "ms", ...}
        self._input: sitk.Image | None = None
        self._world: WorldGeometry = IMAGE_GEOMETRY  # how world clicks map to the input's voxels
        self._oriented: sitk.Image | None = None  # input reoriented to RAS+ (float32, not resampled)
        self._grid: CanonicalGrid | None = None
        self._objects: dict[str, ObjectState] = {}
        self._embeddings: dict[tuple[int, int, int], Any] = {}
        # A model trained to correct the classical prior (interactive/prior.py) carries its settings.
        self.prior = PriorSettings.from_dict(getattr(model, "prior_settings", None))
        self._crop_priors: dict[tuple[int, int, int], CropPrior] = {}
        # A prior model whose residual is exactly zero (a refine-head-only model) is its prior: the encoder and
        # decoder would add 0, so they are skipped (`residual_is_zero`); the masks are the same bit for bit.
        self.prior_only = self.prior is not None and residual_is_zero(model)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, preset: str | None = None, device: str = "auto",
                        attention: str = "auto", **kwargs: Any) -> "Predictor":
        """Load a checkpoint file (any official layout) and wrap it."""
        from fastsam3d_cli.device import resolve_device
        from fastsam3d_cli.model.checkpoint import load_model

        torch_device = resolve_device(device)
        model, _ = load_model(checkpoint, preset=preset, device=torch_device, attention=attention)
        return cls(model, torch_device, **kwargs)

    @classmethod
    def from_pretrained(cls, name: str | None = None, device: str = "auto", attention: str = "auto",
                        offline: bool | None = None, **kwargs: Any) -> "Predictor":
        """Load a named model: published weights from the cache (downloaded unless offline) or `bundled`.

        No name: the default model — the published `fastsam3d`, or the bundled one (with a note on stderr)
        when that cannot be fetched."""
        from fastsam3d_cli.weights.loading import load_inference_model

        loaded = load_inference_model(model=name, device=device, attention=attention, offline=offline)
        return cls(loaded.model, loaded.device, **kwargs)

    # ------------------------------------------------------------------------------ the volume
    def set_volume(self, volume: sitk.Image | str | Path, channel: int | None = None,
                   world: WorldGeometry | None = None) -> None:
        """Read (if a path) and preprocess the volume: canonical orientation, 1.5 mm, float32. Clears all objects.

        World clicks (ras/lps) on a NIfTI path go through the file's own affine (`imaging.world`); for an image
        already read, pass `world=world_geometry(path, image)` to get the same (else the image's geometry is used).
        """
        if isinstance(volume, (str, Path)):
            start = time.perf_counter()
            path = volume
            volume = read_image(path, channel, strict_channel=True)
            if world is None:
                world = world_geometry(path, volume)
            self._record("read", start)
        if not isinstance(volume, sitk.Image) or volume.GetDimension() != 3 or volume.GetNumberOfComponentsPerPixel() != 1:
            raise BadInputError("the volume must be a 3D scalar image", "give a 3D volume (read 4D ones with a channel)")
        start = time.perf_counter()
        oriented = to_canonical(sitk.Cast(volume, sitk.sitkFloat32))
        size, spacing, origin, direction = resampled_grid(oriented, self.spacing_mm)
        self._input, self._oriented = volume, oriented
        self._world = world if world is not None else geometry_from_metadata(volume)
        self._grid = CanonicalGrid(tuple(size), spacing, origin, direction)  # type: ignore[arg-type]
        self._objects.clear()
        self._embeddings.clear()
        self._crop_priors.clear()
        self._record("preprocess", start)

    @property
    def input_image(self) -> sitk.Image:
        """The volume as given (its grid is the grid of every returned mask)."""
        return self._require_volume()[0]

    @property
    def world(self) -> WorldGeometry:
        """How world (ras/lps) clicks map to the input's voxels (`imaging.world`)."""
        self._require_volume()
        return self._world

    @property
    def canonical_grid(self) -> CanonicalGrid:
        """Geometry of the canonical RAS+ 1.5 mm grid crops are cut from (crop boxes are its voxel indices)."""
        return self._require_volume()[1]

    def canonical_volume(self) -> sitk.Image:
        """The whole volume resampled onto the canonical grid (float32; for inspection — crops never need it)."""
        return resample_to_spacing(self._require_volume()[2], self.spacing_mm, "linear")

    @property
    def objects(self) -> list[str]:
        return list(self._objects)

    def object_state(self, object: str) -> ObjectState:  # noqa: A002 - the natural name for users
        if object not in self._objects:
            raise UsageError(f"no object called '{object}'", f"objects so far: {', '.join(self._objects) or 'none'}")
        return self._objects[object]

    # ------------------------------------------------------------------------------ clicks
    def add_click(self, point: Sequence[float], include: bool = True, space: str = "ras",
                  object: str = "object") -> np.ndarray:  # noqa: A002
        """Add one click to `object` and return its mask: bool array on the input grid, ijk (NIfTI) order.

        point: (3,) in `space` — "ras"/"lps" world millimetres, or "ijk" voxel index of the input volume.
        An object's first click must be an include click (as in a click file).
        """
        if np.ndim(point) != 1 or np.size(point) != 3:
            raise UsageError(f"a click is 3 numbers [x, y, z], not an array of shape {np.shape(point)}",
                             "pass one point, e.g. add_click([12.5, -40.0, 101.0])")
        self.add_clicks([point], [1 if include else 0], space=space, object=object, return_mask=False)
        return self.mask(object)

    def add_clicks(self, points: Sequence[Sequence[float]], point_labels: Sequence[int], space: str = "ras",
                   object: str = "object", return_mask: bool = True) -> np.ndarray | None:  # noqa: A002
        """Add several clicks to `object`, applied in order, one decoder step each; return its mask.

        For a new object the primary crop is centred on the bounding box of all these clicks (what
        `fastsam3d infer` does with a click file); crop extension runs once at the end. A prior-only model
        (zero residual) decodes each crop once, after the last of these clicks in it: the same mask.
        """
        input_image, canonical, _ = self._require_volume()
        name = str(object)
        existing = len(self._objects[name].clicks) if name in self._objects else 0
        array = _points_array(points)
        if len(array) != len(point_labels) or not len(array):
            raise UsageError(f"{len(array)} points but {len(point_labels)} point labels", "give one label per point")
        if space not in ("ijk", "ras", "lps"):
            raise UsageError(f"unknown click space '{space}'", "use ras, lps or ijk")
        labels = _point_labels(point_labels)
        for number, point in enumerate(array, start=existing + 1):
            if not np.all(np.isfinite(point)):
                raise BadInputError(f"click {number} of object '{name}' ({space} {list(point)}) has a non-finite "
                                    "coordinate", "give finite numbers only")
        started = name in self._objects and self._objects[name].initial is not None
        if existing == 0 and 1 not in labels and not started:
            raise BadInputError(f"object '{name}' would have only exclude clicks",
                                "start an object with an include click (include=True / point label 1)")
        self._world.check_space(space)
        lps = to_lps(array, space, input_image, self._world.ras_from_ijk)
        original = tuple(tuple(float(c) for c in p) for p in array)
        check_inside(ClickObject(name, 1, original, labels), lps, input_image, space,  # type: ignore[arg-type]
                     first_number=existing + 1)
        state = self._objects.setdefault(name, ObjectState(name))
        indices = lps_to_ijk(lps, canonical)
        new = [Click(p, bool(v), i) for p, v, i in zip(lps, labels, indices)]
        if not state.crops:
            box = self._primary_box(indices)
            prompt = self._initial_prompt(state, box)  # a starting mask is the first crop's mask prompt
            state.crops.append(CropRun(box, "primary", low_res=prompt, transferred=prompt is not None))
        changed: list[CropRun] = []
        # A prior-only model's crop logits depend on nothing but the crop's clicks, so a crop that several of
        # these clicks reach is decoded once, after the last of them: the same result, one step instead of
        # many. Only without extension crops, whose routing (`shown_box`) would see the skipped steps.
        pending: dict[int, tuple[CropRun, int]] | None = (
            {} if self.prior_only and len(new) > 1 and all(c.kind != "extension" for c in state.crops) else None)
        for click in new:
            state.clicks.append(click)
            applied = self._apply_click(state, len(state.clicks) - 1, pending)
            changed += [c for c in applied if all(c is not d for d in changed)]
        for crop, number in (pending or {}).values():
            self._decode_step(state, crop, state.clicks[number].index, state.clicks[number].include, click=number + 1)
            crop.clicks.append(number)
        self._update_extensions(state, changed)
        return self.mask(name) if return_mask else None

    def primary_crop_for(self, points: Sequence[Sequence[float]], space: str = "ras") -> CropBox:
        """The primary crop (canonical-grid box) `add_clicks` would choose for a new object with these clicks.

        `serve` compares it with an object's crop to know whether one more click can be applied alone
        (one decoder step) and still equal the replay of all the clicks."""
        input_image, canonical, _ = self._require_volume()
        self._world.check_space(space)
        indices = lps_to_ijk(to_lps(_points_array(points), space, input_image, self._world.ras_from_ijk), canonical)
        return self._primary_box(indices)

    def set_mask(self, mask: np.ndarray, object: str = "object") -> None:  # noqa: A002
        """Start `object` from an existing mask (array on the input grid, ijk; nonzero = the object).

        The object's clicks and crops are replaced. Until a click it is this mask; a click's new crop gets the
        mask as its first mask prompt (the model refines it there, an exclude click may come first), and
        outside every crop the mask stays as given. BadInputError (exit 3) for another grid or an empty mask.
        """
        size = tuple(self.input_image.GetSize())
        array = np.asarray(mask)
        if array.shape != size:
            raise BadInputError(f"the mask has {list(array.shape)} voxels and the volume {list(size)}",
                                "give a mask on the volume's own grid")
        inside = array != 0
        hit = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        if not hit[0].size:
            raise BadInputError("the mask is empty", "give a mask with at least one voxel of the object")
        box = tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hit)
        logits = np.where(inside[box], np.float32(INITIAL_LOGIT), np.float32(-INITIAL_LOGIT))
        name = str(object)
        self._objects[name] = ObjectState(name, initial=(tuple(int(b.start) for b in box), logits))  # type: ignore[arg-type]

    def reset_object(self, object: str | None = None) -> None:  # noqa: A002
        """Forget the clicks, crops and starting mask of `object` (all objects when None); cached embeddings stay."""
        if object is None:
            self._objects.clear()
        else:
            self._objects.pop(str(object), None)

    def free_merged(self, object: str | None = None) -> None:  # noqa: A002
        """Free the merged-logits cache of `object` (all objects when None); it is rebuilt when needed.

        The cache keeps further clicks cheap (~6–10 bytes per voxel of the object's crops); a batch caller
        that segments many objects once (`infer`) frees it after each object to keep memory flat.
        """
        for name, state in self._objects.items():
            if object is None or name == str(object):
                state.canvas = None

    # ------------------------------------------------------------------------------ results
    def mask(self, object: str = "object") -> np.ndarray:  # noqa: A002
        """Binary mask of `object` on the input grid (bool, ijk order = NIfTI axis order)."""
        size = tuple(self.input_image.GetSize())
        out = np.zeros(size, dtype=bool)
        patch = self.input_logits(object)
        if patch is not None:
            start, logits = patch
            out[tuple(slice(s, s + n) for s, n in zip(start, logits.shape))] = logits > 0
        return out

    def mask_image(self, object: str = "object") -> sitk.Image:  # noqa: A002
        """The mask as a uint8 SimpleITK image with the input's geometry."""
        from fastsam3d_cli.imaging.volumes import image_from_array_ijk

        return image_from_array_ijk(self.mask(object).astype(np.uint8), self.input_image)

    def input_logits(self, object: str = "object", interpolation: str = "nearest",  # noqa: A002
                     probabilities: bool = False) -> tuple[tuple[int, int, int], np.ndarray] | None:
        """The object's merged logits (or sigmoid probabilities) resampled onto the input grid.

        Returns (start ijk, float32 array) covering only the part of the input grid the crops reach
        (the rest is "no object"), or None when no crop of the object reaches the input grid.
        """
        state = self.object_state(object)
        fill = 0.0 if probabilities else UNCOVERED_LOGIT
        initial = state.initial
        if initial is not None and probabilities:
            initial = (initial[0], _sigmoid(initial[1]).astype(np.float32))
        if not state.crops:
            return initial  # a starting mask without clicks (None: nothing)
        merged = self._merged(state)
        start, canvas = merged.start, merged.logits
        if canvas is None:
            return initial
        uncovered = merged.owner < 0 if len(merged.boxes) > 1 else None  # one crop covers its whole canvas
        values = _sigmoid(canvas).astype(np.float32) if probabilities else canvas
        # with a starting mask, what no crop covers keeps that mask: mark it (NaN) and fill it in afterwards
        gap = np.float32(np.nan) if initial is not None else np.float32(fill)
        if uncovered is not None and uncovered.any():
            values = np.where(uncovered, gap, values).astype(np.float32)
        start_time = time.perf_counter()
        patch = _resample_canvas(values, start, self.canonical_grid, self.input_image, interpolation, float(gap))
        if initial is not None:
            patch = _under(patch, initial, fill)
        self._record("paste", start_time, object=state.name)
        return patch

    def probabilities(self, object: str = "object") -> np.ndarray:  # noqa: A002
        """Sigmoid probabilities of `object` on the input grid (float32, ijk), linear interpolation."""
        out = np.zeros(tuple(self.input_image.GetSize()), dtype=np.float32)
        patch = self.input_logits(object, interpolation="linear", probabilities=True)
        if patch is not None:
            start, values = patch
            out[tuple(slice(s, s + n) for s, n in zip(start, values.shape))] = values
        return out

    def object_report(self, object: str = "object") -> dict[str, Any]:  # noqa: A002
        """What was run for `object`: its clicks (all three spaces, used or not) and its crops."""
        from fastsam3d_cli.imaging.clickfile import all_spaces

        state = self.object_state(object)
        canonical = self.canonical_grid
        used = {i for crop in state.crops for i in crop.clicks}
        spaces = all_spaces(np.array([c.lps for c in state.clicks]).reshape(-1, 3), self.input_image,
                            self._world.ras_from_ijk)
        clicks = [{"number": n + 1, "include": c.include, **spaces[n], "used": n in used}
                  for n, c in enumerate(state.clicks)]
        crops = []
        for crop in state.crops:
            entry = {"kind": crop.kind, **crop.box.as_dict(),
                     "origin_lps": [round(v, 4) for v in canonical.TransformIndexToPhysicalPoint(
                         [int(s) for s in crop.box.start])],
                     "clicks": [i + 1 for i in crop.clicks]}
            if crop.synthetic_click is not None:
                entry["synthetic_click_lps"] = [round(v, 4) for v in canonical.TransformIndexToPhysicalPoint(
                    crop.synthetic_click)]
            crops.append(entry)
        return {"name": state.name, "clicks": clicks, "crops": crops, "crops_run": len(state.crops),
                "unused_clicks": [n + 1 for n in range(len(state.clicks)) if n not in used],
                "initial_mask_voxels": None if state.initial is None else int((state.initial[1] > 0).sum())}

    # ------------------------------------------------------------------------------ internals
    def _require_volume(self) -> tuple[sitk.Image, CanonicalGrid, sitk.Image]:
        if self._input is None or self._grid is None or self._oriented is None:
            raise UsageError("no volume is set", "call set_volume(image_or_path) first")
        return self._input, self._grid, self._oriented

    @property
    def _shape(self) -> tuple[int, int, int]:
        return self._require_volume()[1].size

    def _crop_volume(self, box: CropBox, normalize: bool = False) -> np.ndarray:
        """The box's voxels of the canonical grid (float32, ijk), linear from the reoriented volume, 0 outside
        the grid — identical to resampling the whole volume and cutting the crop out with zero padding.
        Non-finite input values (NaN/inf in float volumes) become 0. `normalize`: also z-normalise over
        voxels > 0 (the model input). Timed as one "preprocess" stage."""
        _, grid, oriented = self._require_volume()
        start = time.perf_counter()
        # The output grid is described with its axes reversed (spacing reversed, direction columns
        # reversed), so SimpleITK's (z, y, x) array of it is already the crop in ijk order: no transpose copy.
        resampled = resample_onto(oriented, size=(box.size,) * 3, spacing=tuple(reversed(grid.spacing)),
                                  origin=grid.TransformIndexToPhysicalPoint(box.start),
                                  direction=tuple(np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)[:, ::-1].ravel()),
                                  interpolation="linear", default_value=0.0)
        crop = np.nan_to_num(sitk.GetArrayFromImage(resampled).astype(np.float32, copy=False),
                             copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        inside = _inside_slices(box, grid.size)
        if any(s.start > 0 or s.stop < box.size for s in inside):  # zero what lies outside the grid
            values, crop = crop, np.zeros_like(crop)
            crop[inside] = values[inside]
        if normalize:
            crop = znormalize_foreground(crop)
        self._record("preprocess", start, crop=list(box.start))
        return crop

    def _initial_prompt(self, state: ObjectState, box: CropBox) -> Any:
        """The starting mask resampled onto a crop (linear, physical positions) and pooled to the low-res
        prompt (1, 1, 32, 32, 32); None when the object has no starting mask."""
        import torch
        import torch.nn.functional as F

        if state.initial is None:
            return None
        input_image, grid, _ = self._require_volume()
        start, logits = state.initial
        source = sitk.GetImageFromArray(np.ascontiguousarray(logits.transpose(2, 1, 0)))
        source.SetSpacing(input_image.GetSpacing())
        source.SetDirection(input_image.GetDirection())
        source.SetOrigin(input_image.TransformIndexToPhysicalPoint([int(v) for v in start]))
        resampled = resample_onto(source, size=(box.size,) * 3, spacing=tuple(reversed(grid.spacing)),
                                  origin=grid.TransformIndexToPhysicalPoint(box.start),
                                  direction=tuple(np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)[:, ::-1].ravel()),
                                  interpolation="linear", default_value=-INITIAL_LOGIT)
        crop = torch.from_numpy(np.ascontiguousarray(sitk.GetArrayFromImage(resampled), dtype=np.float32))
        factor = self.crop_size // self.low_res_size
        return F.avg_pool3d(crop[None, None], kernel_size=factor, stride=factor).to(self.device)

    def _record(self, stage: str, start: float, **details: Any) -> None:
        self.timings.append({"stage": stage, "ms": (time.perf_counter() - start) * 1000.0, **details})

    def _primary_box(self, indices: np.ndarray) -> CropBox:
        """Crop centred on the clicks' bounding box; on the first click if that box would hold none."""
        box = box_centered_on((indices.min(axis=0) + indices.max(axis=0)) / 2.0, self.crop_size)
        if not any(box.contains(i) for i in indices):
            box = box_centered_on(indices[0], self.crop_size)
        return box

    def _lattice_box(self, state: ObjectState, index: np.ndarray) -> CropBox:
        """The crop on the object's lattice (primary start + k·step) whose centre is nearest to `index`."""
        primary = state.crops[0].box
        centre = np.asarray(primary.center)
        steps = np.round((np.asarray(index) - centre) / self.extension_step).astype(int)
        return primary.shifted(tuple(int(s) * self.extension_step for s in steps))

    def _apply_click(self, state: ObjectState, number: int,
                     pending: dict[int, tuple[CropRun, int]] | None = None) -> list[CropRun]:
        """One decoder step with click `number` in each crop that must see it; returns the crops decoded.

        With `pending` (see `add_clicks`) the step is only recorded there, keyed by crop, and run later.

        Those are the primary/click crops containing the click and the crop whose logits are shown at its
        voxel — so a click corrects an extension crop where that crop is what the user sees. A click
        outside every crop gets a new crop on the object's lattice, prompted with the mask so far (making
        room by dropping extension crops nobody clicked in, newest first, when max_crops is reached).
        """
        click = state.clicks[number]
        shown = shown_box([c.box for c in state.crops if c.logits is not None], click.index, self._shape)
        targets = [c for c in state.crops if c.box.contains(click.index) and (c.kind != "extension" or c.box == shown)]
        if not targets:
            self._make_room(state)
            if len(state.crops) >= self.max_crops:
                return []  # reported as an unused click (raise max_crops)
            box = self._lattice_box(state, click.index)
            if self.prior_only:  # its steps never read a prompt (a zero residual): no merge to hand one over
                crop = CropRun(box, "click")
            else:
                crop = CropRun(box, "click", low_res=self._transfer_prompt(self._merged(state).region(box), box),
                               transferred=True)
            state.crops.insert(sum(c.kind != "extension" for c in state.crops), crop)
            targets = [crop]
        for crop in targets:
            if pending is None:
                self._decode_step(state, crop, click.index, click.include, click=number + 1)
                crop.clicks.append(number)
                continue
            if id(crop) in pending:  # an earlier click of this batch, applied in the step that replaces its own
                crop.clicks.append(pending[id(crop)][1])
            pending[id(crop)] = (crop, number)
        return targets

    def _make_room(self, state: ObjectState) -> None:
        """At max_crops, drop the newest extension crop without clicks (and the crops grown from it)."""
        if len(state.crops) < self.max_crops:
            return
        droppable = [c for c in state.crops if c.kind == "extension" and not c.clicks]
        if droppable:
            self._drop_extensions(state, {droppable[-1].box})

    def _drop_extensions(self, state: ObjectState, boxes: set[CropBox]) -> None:
        """Remove these extension crops and, transitively, the click-less extension crops grown from them."""
        dropped = set(boxes)
        while True:
            more = {c.box for c in state.crops if c.kind == "extension" and not c.clicks and c.parent in dropped}
            if more <= dropped:
                break
            dropped |= more
        state.crops = [c for c in state.crops if c.box not in dropped]

    def _embedding(self, box: CropBox) -> Any:
        """Image embedding of a crop (encoded once, then cached)."""
        import torch

        key = tuple(box.start)
        if key not in self._embeddings:
            crop = self._crop_volume(box, normalize=True)  # timed as "preprocess"
            start = time.perf_counter()
            volume = torch.from_numpy(crop)[None, None].to(self.device)
            with torch.inference_mode():
                self._embeddings[key] = self.model.encode(volume)
            if self.prior is not None:
                self._crop_priors[key] = CropPrior(crop, self.spacing_mm)
            _synchronize(self.device)
            self._record("encode", start, crop=list(key))
        return self._embeddings[key]

    def _decode_step(self, state: ObjectState, crop: CropRun, index: np.ndarray, include: bool, click: Any) -> None:
        """Prompt encoder + decoder with ONE new point and the crop's previous low-res logits."""
        import torch

        embedding = None if self.prior_only else self._embedding(crop.box)
        start = time.perf_counter()
        points = torch.as_tensor(crop.box.to_crop(index), dtype=torch.float32, device=self.device).view(1, 1, 3)
        labels = torch.tensor([[1 if include else 0]], dtype=torch.int64, device=self.device)
        if self.prior is not None:
            self._decode_with_prior(state, crop, embedding, points, labels, index, include, click)
        else:
            previous = crop.low_res if crop.low_res is not None else torch.zeros(
                (1, 1) + (self.low_res_size,) * 3, dtype=torch.float32, device=self.device)
            with torch.inference_mode():
                low_res, _ = self.model.decode(embedding, points, labels, previous)
                full = self.model.upsample_logits(low_res)
            crop.low_res = low_res
            crop.logits = full[0, 0].float().cpu().numpy()
        crop.transferred = False
        crop.version += 1
        self._record("decode", start, object=state.name, click=click, crop=list(crop.box.start))

    def _decode_with_prior(self, state: ObjectState, crop: CropRun, embedding: Any, points: Any, labels: Any, index: np.ndarray,
                           include: bool, click: Any) -> None:
        """One decoder step of a prior model: logits = P + upsample(gate × M) (interactive/prior.py)."""
        import torch

        assert self.prior is not None
        box = crop.box
        clicks = [(box.to_crop(state.clicks[n].index), state.clicks[n].include) for n in crop.clicks]
        if crop.synthetic_click is not None and click != "synthetic":
            clicks.append((box.to_crop(crop.synthetic_click), True))
        clicks.append((box.to_crop(index), include))
        if tuple(box.start) not in self._crop_priors:
            self._crop_priors[tuple(box.start)] = CropPrior(self._crop_volume(box, normalize=True), self.spacing_mm)
        crop_prior = self._crop_priors[tuple(box.start)]
        prior = torch.from_numpy(crop_prior.logits(clicks, self.prior.scale, getattr(self.model, "refine_head", None)))
        prior = prior[None, None].to(self.device)
        # a new crop's prompt is the merged logits so far (prior included): used as they are, once
        if self.prior_only:  # what decode_step returns when M = 0: a zero residual and the prior itself
            crop.low_res = torch.zeros((1, 1) + (self.low_res_size,) * 3, dtype=torch.float32, device=self.device)
            crop.logits = prior[0, 0].float().cpu().numpy()
            return
        transferred = crop.low_res if crop.transferred else None
        with torch.inference_mode():
            residual, full = decode_step(self.model, embedding, points, labels, prior, crop.low_res, self.prior.gate,
                                         prompt=transferred)
        crop.low_res = residual
        crop.logits = full[0, 0].float().cpu().numpy()

    def _update_extensions(self, state: ObjectState, changed: list[CropRun]) -> None:
        """After a click: drop extension crops whose reason is gone, then grow crops where masks reach a face.

        An extension crop keeps its prediction between clicks (a click corrects it where it is shown).
        It is dropped, with the crops grown from it, when its parent was re-decoded and no longer touches
        their shared face — unless it holds a click (applied when it was made, or since). New crops grow
        breadth first from the re-decoded crops, then from the others, up to max_crops; all lie on one
        lattice.
        """
        by_box = {c.box: c for c in state.crops}
        changed_boxes = {c.box for c in changed}
        gone = {c.box for c in state.crops
                if c.kind == "extension" and not c.clicks and c.parent in changed_boxes and c.face is not None
                and not self._touches_open_face(by_box[c.parent], *c.face)}
        if gone:
            self._drop_extensions(state, gone)
        existing = {c.box for c in state.crops}
        queue = [c for c in state.crops if c.box in changed_boxes] + [c for c in state.crops if c.box not in changed_boxes]
        while queue and len(state.crops) < self.max_crops:
            parent = queue.pop(0)
            for axis in range(3):
                for side in (-1, 1):
                    if len(state.crops) >= self.max_crops:
                        return
                    if not self._touches_open_face(parent, axis, side):
                        continue
                    offset = [0, 0, 0]
                    offset[axis] = side * self.extension_step
                    box = parent.box.shifted(offset)
                    if box in existing:
                        continue
                    crop = self._decode_extension(state, box, parent, (axis, side))
                    if crop is not None:  # else another parent may still find a click for this box
                        existing.add(box)
                        state.crops.append(crop)
                        queue.append(crop)

    def _touches_open_face(self, crop: CropRun, axis: int, side: int) -> bool:
        """True when the crop's mask has a voxel on face (axis, side) and the volume continues beyond it."""
        shape = self._shape
        if crop.logits is None:
            return False
        if (side < 0 and crop.box.start[axis] <= 0) or (side > 0 and crop.box.stop[axis] >= shape[axis]):
            return False
        face = list(_inside_slices(crop.box, shape))  # the crop's voxels that lie in the volume
        face[axis] = slice(0, 1) if side < 0 else slice(self.crop_size - 1, self.crop_size)
        return bool((crop.logits[tuple(face)] > 0).any())

    def _decode_extension(self, state: ObjectState, box: CropBox, parent: CropRun,
                          face: tuple[int, int]) -> CropRun | None:
        """A neighbour crop prompted with the mask so far and the clicks inside it (else one synthesised click)."""
        merged = self._merged(state).region(box)  # one view for the prompt and the synthetic click
        inside = [n for n, c in enumerate(state.clicks) if _well_inside(box, c.index, SYNTHETIC_CLICK_MARGIN)]
        synthetic = None if inside else self._synthetic_click(merged, box, parent.box)
        if not inside and synthetic is None:
            return None  # checked before building the prompt: a refused box costs one argmax
        crop = CropRun(box, "extension", low_res=self._transfer_prompt(merged, box), parent=parent.box, face=face,
                       transferred=True)
        for number in inside:
            click = state.clicks[number]
            self._decode_step(state, crop, click.index, click.include, click=number + 1)
            crop.clicks.append(number)
        if synthetic is not None:
            crop.synthetic_click = synthetic
            self._decode_step(state, crop, synthetic, True, click="synthetic")
        return crop

    def _synthetic_click(self, merged: tuple[np.ndarray, np.ndarray | None], box: CropBox,
                         parent: CropBox) -> np.ndarray | None:
        """The most confident mask voxel shared by `box` and `parent`, preferably ≥ margin inside `box`.

        merged: `_merged(state).region(box)`, the mask so far inside `box`."""
        start, canvas = merged
        if canvas is None:
            return None
        shared_lo = np.maximum(np.maximum(box.start, parent.start), 0)
        shared_hi = np.minimum(np.minimum(box.stop, parent.stop), self._shape)
        margin = SYNTHETIC_CLICK_MARGIN
        inner_lo = np.maximum(shared_lo, np.asarray(box.start) + margin)
        inner_hi = np.minimum(shared_hi, np.asarray(box.stop) - margin)
        for lo, hi in ((inner_lo, inner_hi), (shared_lo, shared_hi)):
            lo_c, hi_c = np.maximum(lo - start, 0), np.minimum(hi - start, canvas.shape)
            if np.any(hi_c <= lo_c):
                continue
            region = canvas[tuple(slice(a, b) for a, b in zip(lo_c, hi_c))]
            scores = np.where(np.isnan(region), -np.inf, region)
            best = np.unravel_index(int(np.argmax(scores)), region.shape)
            if scores[best] > 0:
                return np.asarray(best, dtype=np.float64) + lo_c + start
        return None

    def _transfer_prompt(self, merged: tuple[np.ndarray, np.ndarray | None], box: CropBox) -> Any:
        """Low-res prompt (1, 1, 32, 32, 32) for a new crop: the merged logits so far, 0 where unknown.

        merged: `_merged(state).region(box)`, the mask so far inside `box`."""
        import torch
        import torch.nn.functional as F

        start, canvas = merged
        full = np.zeros((self.crop_size,) * 3, dtype=np.float32)
        if canvas is not None:
            relative = CropBox(tuple(int(s - c) for s, c in zip(box.start, start)), self.crop_size)  # type: ignore[arg-type]
            full = np.nan_to_num(extract_crop(canvas, relative, fill=np.nan), nan=0.0)
        tensor = torch.from_numpy(full)[None, None].to(self.device)
        factor = self.crop_size // self.low_res_size
        return F.avg_pool3d(tensor, kernel_size=factor, stride=factor)  # the caller marks the crop `transferred`

    def _merged(self, state: ObjectState) -> CropCanvas:
        """The object's merged logits, brought up to date with its crops (timed as part of "paste")."""
        start = time.perf_counter()
        if state.canvas is None:
            state.canvas = CropCanvas(self._shape)
        state.canvas.sync(state.crops)
        self._record("paste", start, object=state.name, step="merge")
        return state.canvas


# ----------------------------------------------------------------------------------------- helpers
def _points_array(points: Any) -> np.ndarray:
    """Clicks as an (N, 3) float array; a UsageError naming the shape otherwise."""
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError("clicks must be numbers, one [x, y, z] per click", "pass a list of 3-number points") from None
    if array.ndim != 2 or array.shape[1] != 3:
        raise UsageError(f"clicks must have shape (N, 3), one [x, y, z] each, not {array.shape}",
                         "pass a list of 3-number points, e.g. [[12.5, -40.0, 101.0]]")
    return array


def _point_labels(point_labels: Sequence[Any]) -> tuple[int, ...]:
    """1/0 (True/False, 1.0/0.0 too) per click; a UsageError for anything else."""
    labels = []
    for value in point_labels:
        if isinstance(value, str) or value not in (0, 1):
            raise UsageError(f"point label {value!r} is invalid", "use 1 (include) or 0 (exclude)")
        labels.append(int(value))
    return tuple(labels)


def _model_device(model: Any) -> Any:
    import torch

    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _synchronize(device: Any) -> None:
    """Wait for queued CUDA work so that stage timings are honest (no-op on CPU)."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def _inside_slices(box: CropBox, shape: Sequence[int]) -> tuple[slice, ...]:
    """Slices of the crop array covering the part of the box inside a volume of `shape`."""
    return tuple(slice(max(start, 0) - start, max(min(start + box.size, n), max(start, 0)) - start)
                 for start, n in zip(box.start, shape))


def _well_inside(box: CropBox, index: np.ndarray, margin: int) -> bool:
    """True when a canonical position lies at least `margin` voxels inside the box on every axis."""
    local = box.to_crop(index)
    return bool(np.all(local >= margin) and np.all(local <= box.size - 1 - margin))


def _under(patch: tuple[tuple[int, int, int], np.ndarray] | None, initial: tuple[tuple[int, int, int], np.ndarray],
           fill: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """`patch` (NaN where no crop decided) laid over the starting mask `initial`, on their joint box."""
    if patch is None:
        return initial
    boxes = [(np.asarray(s), np.asarray(s) + np.asarray(v.shape)) for s, v in (patch, initial)]
    lo = np.minimum(boxes[0][0], boxes[1][0])
    hi = np.maximum(boxes[0][1], boxes[1][1])
    out = np.full(tuple(hi - lo), np.float32(fill), dtype=np.float32)
    for (start, values) in (initial, patch):
        region = tuple(slice(int(a - b), int(a - b) + n) for a, b, n in zip(start, lo, values.shape))
        decided = ~np.isnan(values)
        out[region][decided] = values[decided]
    return tuple(int(v) for v in lo), out  # type: ignore[return-value]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def _resample_canvas(values: np.ndarray, start: np.ndarray, canonical: Any, target: sitk.Image,
                     interpolation: str, fill: float) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """Resample a canonical-grid block (origin at canonical index `start`) onto the part of `target` it covers.

    Only the target's sub-grid spanned by the block is resampled (same sample points as resampling the whole
    grid, far fewer of them). Returns (target start ijk, float32 ijk array — a transposed view) or None when
    they do not overlap.
    """
    # SimpleITK reads a C-ordered (i, j, k) array as an image whose first axis is k: describe the block with
    # its axes reversed (spacing reversed, direction columns reversed) instead of copying it transposed.
    block = sitk.GetImageFromArray(np.ascontiguousarray(values))
    block.SetSpacing(tuple(reversed(canonical.GetSpacing())))
    block.SetDirection(tuple(np.asarray(canonical.GetDirection(), dtype=np.float64).reshape(3, 3)[:, ::-1].ravel()))
    block.SetOrigin(canonical.TransformIndexToPhysicalPoint([int(s) for s in start]))
    corners = np.array([[lo if bit == 0 else lo + n for bit, lo, n in zip(bits, np.asarray(start) - 0.5, values.shape)]
                        for bits in np.ndindex(2, 2, 2)], dtype=np.float64)
    corners_in_target = lps_to_ijk(corners @ affine_lps(canonical)[:3, :3].T + affine_lps(canonical)[:3, 3], target)
    size = np.asarray(target.GetSize())
    lo = np.clip(np.floor(corners_in_target.min(axis=0)).astype(int), 0, size)
    hi = np.clip(np.ceil(corners_in_target.max(axis=0)).astype(int) + 1, 0, size)
    if np.any(hi <= lo):
        return None
    resampled = resample_onto(block, size=hi - lo, spacing=target.GetSpacing(),
                              origin=target.TransformIndexToPhysicalPoint([int(v) for v in lo]),
                              direction=target.GetDirection(), interpolation=interpolation,  # type: ignore[arg-type]
                              default_value=fill)
    return tuple(int(v) for v in lo), sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # type: ignore[return-value]
