"""One open volume in the server: its `Predictor`, its objects (name, label, colour) and their click histories.

No HTTP here. An object's mask is always what `fastsam3d infer` computes for the object's clicks in order
(`Predictor.add_clicks` of all of them on a fresh object): so undo/redo are exact, and the click
file `export_clicks` writes replays to the same labelmap. When the previous clicks left the object in one
crop that the new click does not move, the new click is applied incrementally (one decoder step), which
gives the same result as the replay; otherwise the object is recomputed from its clicks (cached crop
embeddings are reused, so that costs decoder steps, and an encode only when the crop moves).
"""
from __future__ import annotations

import functools
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastsam3d_cli.errors import FastSAM3DError
from fastsam3d_cli.serve.errors import ApiError

_THREAD = threading.local()


def _tune_this_thread(device: Any) -> None:
    """Flush-to-zero of subnormal floats is per-thread CPU state: set it in each server thread that computes."""
    if not getattr(_THREAD, "tuned", False):
        from fastsam3d_cli.model.cpu_runtime import tune_cpu_for_inference

        tune_cpu_for_inference(device)
        _THREAD.tuned = True


PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
           "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000")
MAX_LABEL = 65535
_UNREAD = object()  # Session(nifti_header=...) not given: read it from volume_path when first needed


@dataclass
class ObjectSpec:
    """An object of a session: what the labelmap calls it and its clicks, in order.

    Clicks are kept as continuous voxel indices (ijk) of the input volume: a world click is converted once
    (through the file's own affine, as `infer` does), so the exported click file (space ijk) replays it on
    the same voxel whatever the header.
    """

    name: str
    label: int
    colour: str
    clicks: list[tuple[tuple[float, float, float], bool]] = field(default_factory=list)
    redo: list[tuple[tuple[float, float, float], bool]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)  # one record per click / undo / redo
    initial: np.ndarray | None = field(default=None, repr=False)  # a starting mask (bool, input grid), if any
    initial_voxels: int | None = None  # its voxel count (counted once)

    @property
    def point_labels(self) -> tuple[int, ...]:
        return tuple(1 if include else 0 for _, include in self.clicks)

    @property
    def has_mask(self) -> bool:
        """True when the object has something to show: clicks or a starting mask."""
        return bool(self.clicks) or self.initial is not None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "colour": self.colour, "clicks": len(self.clicks),
                "redo": len(self.redo),
                "initial_mask_voxels": self.initial_voxels}


class Session:
    """A volume open in the server. Callers hold `lock` around every call (the store does)."""

    def __init__(self, session_id: str, predictor: Any, volume_path: Path, display_name: str,
                 compute_lock: threading.Lock, owned_dir: Path | None = None, nifti_header: Any = _UNREAD,
                 viewer_path: Path | None = None) -> None:
        self.id = session_id
        self.predictor = predictor
        self.volume_path = volume_path
        self.viewer_path = viewer_path or volume_path  # what the page loads (a DICOM series: a NIfTI of it)
        self.display_name = display_name
        self.owned_dir = owned_dir  # a temporary folder (uploads, a DICOM series' NIfTI) removed when it closes
        if nifti_header is not _UNREAD:  # already read with the volume (`Server._make`); None: not a NIfTI
            self.nifti_header = nifti_header
        self.lock = threading.RLock()
        self.compute_lock = compute_lock  # one model shared by all sessions: one computation at a time
        self.objects: dict[str, ObjectSpec] = {}
        self.created = time.time()
        self._masks: dict[str, np.ndarray] = {}  # each object's mask since its last change (read-only)
        # each object's logits on the input grid since its last change: the labelmap is composed from these,
        # so a click resamples only the object it changed; with the mask's box and voxel count (read once)
        self._patches: dict[str, Any] = {}
        self._extents: dict[str, tuple[tuple[list[int], list[int]] | None, int]] = {}
        self.bytes_estimate = self.approximate_bytes()  # updated after every request (the store's memory cap)

    # ------------------------------------------------------------------------------ objects
    def add_object(self, name: str, label: int | None = None, colour: str | None = None) -> ObjectSpec:
        name = str(name).strip()
        if not name:
            raise ApiError(422, "field 'name': an object needs a non-empty name")
        if "/" in name or "\\" in name or any(ord(c) < 32 for c in name) or len(name) > 200:
            raise ApiError(422, f"field 'name': {name[:40]!r} — use up to 200 characters without '/', '\\' or "
                                "control characters (the name goes into URLs and file names)")
        if name in self.objects:
            raise ApiError(409, f"object '{name}' already exists in session {self.id}")
        used = {o.label for o in self.objects.values()}
        if label is None:
            label = next(n for n in range(1, MAX_LABEL + 1) if n not in used)
        if isinstance(label, bool) or not isinstance(label, int) or not 1 <= label <= MAX_LABEL:
            raise ApiError(422, f"field 'label': {label!r} is not an integer from 1 to {MAX_LABEL}")
        if label in used:
            raise ApiError(409, f"label {label} is already used by another object of session {self.id}")
        if colour is None:
            colour = PALETTE[len(self.objects) % len(PALETTE)]
        if not (isinstance(colour, str) and len(colour) == 7 and colour[0] == "#"
                and all(c in "0123456789abcdefABCDEF" for c in colour[1:])):
            raise ApiError(422, f"field 'colour': {colour!r} is not a #rrggbb colour")
        spec = ObjectSpec(name, int(label), colour.lower())
        self.objects[name] = spec
        return spec

    def object(self, name: str) -> ObjectSpec:
        if name not in self.objects:
            raise ApiError(404, f"no object '{name}' in session {self.id}")
        return self.objects[name]

    def delete_object(self, name: str) -> None:
        self.object(name)
        del self.objects[name]
        self._forget(name)
        self.predictor.reset_object(name)

    def reset_object(self, name: str) -> ObjectSpec:
        """Forget the object's clicks, its redo history and its starting mask; the object stays."""
        spec = self.object(name)
        spec.clicks.clear()
        spec.redo.clear()
        spec.initial, spec.initial_voxels = None, None
        self._forget(name)
        self.predictor.reset_object(name)
        return spec

    # ------------------------------------------------------------------------------ clicks
    def click(self, name: str, point: Sequence[float], include: bool, space: str) -> dict[str, Any]:
        """Add one click to object `name` (point in `space`: ijk of the input volume, ras or lps mm)."""
        spec = self.object(name)
        if not spec.clicks and not include and spec.initial is None:
            raise ApiError(400, f"field 'include': the first click of object '{name}' must be an include click "
                                "(or start it from a mask)")
        ijk = self._checked_ijk(spec, point, space, len(spec.clicks) + 1, "point")
        spec.clicks.append((ijk, bool(include)))
        spec.redo.clear()
        return self._update(spec, "click")

    def set_points(self, name: str, include: Sequence[Sequence[float]], exclude: Sequence[Sequence[float]],
                   space: str = "ijk") -> dict[str, Any]:
        """Make the object's clicks these include and exclude points (MONAI Label sends all points each time).

        When the object's clicks so far are among them, the new points are appended (their order kept);
        otherwise the object starts over with the include points, then the exclude points.
        """
        if name not in self.objects:
            self.add_object(name)
        spec = self.objects[name]
        wanted = [(self._checked_ijk(spec, p, space, n, "foreground"), True) for n, p in enumerate(include, start=1)]
        wanted += [(self._checked_ijk(spec, p, space, n, "background"), False) for n, p in enumerate(exclude, start=1)]
        if not any(flag for _, flag in wanted):
            raise ApiError(422, "field 'foreground': give at least one foreground point")
        remaining = list(wanted)
        for click in spec.clicks:
            if click not in remaining:
                remaining = None  # type: ignore[assignment]
                break
            remaining.remove(click)
        appended = None if remaining is None else len(remaining)
        if appended != 0:
            spec.clicks = wanted if remaining is None else spec.clicks + remaining
            spec.redo.clear()
        return self._update(spec, "points", appended)

    def _checked_ijk(self, spec: ObjectSpec, point: Sequence[float], space: str, number: int,
                     field_name: str) -> tuple[float, float, float]:
        """A click as a continuous ijk index of the input volume (400/422 naming the field when unusable)."""
        from fastsam3d_cli.imaging.clickfile import ClickObject, check_inside, lps_to_ijk, to_lps

        if space not in ("ijk", "ras", "lps"):
            raise ApiError(422, f"field 'space': {space!r} is not one of ijk, ras, lps")
        try:
            values = np.asarray(point, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ApiError(422, f"field '{field_name}': give three numbers per point") from None
        if values.shape != (3,) or not np.all(np.isfinite(values)):
            raise ApiError(422, f"field '{field_name}': give three finite numbers per point")
        image = self.predictor.input_image
        world = self.predictor.world  # ras/lps through the file's own affine, as infer and the viewer place them
        try:
            world.check_space(space)
        except FastSAM3DError as exc:
            raise ApiError(400, f"field 'space': {exc.message}") from None
        lps = to_lps(values[None], space, image, world.ras_from_ijk)
        try:
            check_inside(ClickObject(spec.name, spec.label, (tuple(float(v) for v in values),), (1,)), lps, image,
                         space, first_number=number)
        except FastSAM3DError as exc:
            raise ApiError(400, f"field '{field_name}': {exc.message}") from None
        ijk = values if space == "ijk" else lps_to_ijk(lps, image)[0]
        return (float(ijk[0]), float(ijk[1]), float(ijk[2]))

    def undo(self, name: str) -> dict[str, Any]:
        spec = self.object(name)
        if not spec.clicks:
            raise ApiError(409, f"object '{name}' has no click to undo")
        if len(spec.clicks) > 1 and not any(include for _, include in spec.clicks[:-1]) and spec.initial is None:
            raise ApiError(409, f"undoing would leave object '{name}' with only exclude clicks")
        spec.redo.append(spec.clicks.pop())
        return self._update(spec, "undo")

    def redo(self, name: str) -> dict[str, Any]:
        spec = self.object(name)
        if not spec.redo:
            raise ApiError(409, f"object '{name}' has nothing to redo")
        spec.clicks.append(spec.redo.pop())
        return self._update(spec, "redo")

    def _update(self, spec: ObjectSpec, action: str, appended: int | None = None) -> dict[str, Any]:
        """Bring the predictor's object in line with spec.clicks; time it; return the object's summary.

        appended: how many clicks were added at the end since the last update (None: the list changed
        otherwise); 0 means nothing changed, 1 may be applied incrementally like a click."""
        predictor = self.predictor
        start = time.perf_counter()
        first = len(predictor.timings)
        with self.compute_lock:
            _tune_this_thread(self.predictor.device)
            if appended == 0:
                mode = "unchanged"
            elif action == "mask":
                mode = "set"  # the caller set the predictor's object already (`set_mask`)
            elif (action == "click" or appended == 1) and self._can_extend(spec):
                mode = "incremental"
            else:
                mode = "replay"
            if mode == "incremental":
                predictor.add_clicks([spec.clicks[-1][0]], [spec.point_labels[-1]], space="ijk", object=spec.name,
                                     return_mask=False)
            elif mode == "replay":
                predictor.reset_object(spec.name)
                if spec.initial is not None:
                    predictor.set_mask(spec.initial, spec.name)
                if spec.clicks:
                    predictor.add_clicks([p for p, _ in spec.clicks], list(spec.point_labels), space="ijk",
                                         object=spec.name, return_mask=False)
            before = self._extents.get(spec.name, (None, 0))[0]
            if mode != "unchanged":
                self._forget(spec.name)
            self._patch_locked(spec.name)
            after, voxels = self._extents[spec.name]
            changed = _union_box(before, after)
        stages = predictor.timings[first:]
        record = {"action": action, "mode": mode, "clicks": len(spec.clicks),
                  "ms": round((time.perf_counter() - start) * 1000.0, 2),
                  **{stage: round(sum(t["ms"] for t in stages if t["stage"] == stage), 2)
                     for stage in ("preprocess", "encode", "decode", "paste")}}
        spec.timings.append(record)
        voxel_ml = float(np.prod(predictor.input_image.GetSpacing())) / 1000.0
        return {**spec.describe(), "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 4), "timing": record,
                "changed": None if changed is None else {"start": changed[0], "shape": changed[1]}}

    def set_mask(self, name: str, mask: np.ndarray) -> dict[str, Any]:
        """Start object `name` from `mask` (bool, input grid): its clicks and redo history are replaced."""
        spec = self.object(name)
        with self.compute_lock:
            try:
                self.predictor.set_mask(mask, spec.name)  # checks the grid and that it is not empty
            except FastSAM3DError as exc:
                raise ApiError(400, exc.message) from None
        spec.initial = np.asarray(mask) != 0
        spec.initial.flags.writeable = False
        spec.initial_voxels = int(spec.initial.sum())
        spec.clicks.clear()
        spec.redo.clear()
        return self._update(spec, "mask")

    def _can_extend(self, spec: ObjectSpec) -> bool:
        """True when applying the newest click alone gives what replaying all clicks gives.

        That holds when the object so far is exactly one crop (no extension or click crops) holding every
        earlier click, and the crop the replay would centre on all the clicks is that same crop: then the
        replay runs the same decoder steps in the same crop, and crop extension once at the end, as here.
        """
        predictor = self.predictor
        if len(spec.clicks) < 2 or spec.name not in predictor.objects:
            return False
        state = predictor.object_state(spec.name)
        if len(state.crops) != 1 or len(state.clicks) != len(spec.clicks) - 1:
            return False
        return predictor.primary_crop_for([p for p, _ in spec.clicks], space="ijk") == state.crops[0].box

    # ------------------------------------------------------------------------------ results
    @functools.cached_property
    def nifti_header(self) -> Any:
        """The input's NIfTI header that results keep (infer's rule; None for other formats), read at most once."""
        from fastsam3d_cli.imaging.world import nifti_header

        return nifti_header(self.volume_path, self.predictor.input_image)

    def volume_bytes(self, array: np.ndarray, suffix: str) -> bytes:
        """`array` (ijk, on the input grid) as a `suffix` file written by infer's writer (input header kept)."""
        from fastsam3d_cli.interactive.infer import write_volume

        with tempfile.TemporaryDirectory(prefix="fastsam3d-serve-") as folder:
            path = Path(folder) / f"volume{suffix}"
            write_volume(array, self.predictor.input_image, self.nifti_header, path)
            return path.read_bytes()

    def mask(self, name: str) -> np.ndarray:
        """The object's mask on the input grid (bool, ijk)."""
        spec = self.object(name)
        with self.compute_lock:
            _tune_this_thread(self.predictor.device)
            return self._mask_locked(spec.name)

    def _patch_locked(self, name: str) -> Any:
        """The object's (start, logits) on the input grid (`Predictor.input_logits`), cached until it changes."""
        if name not in self._patches:
            patch = self.predictor.input_logits(name) if name in self.predictor.objects else None
            self._patches[name] = patch
            self._extents[name] = _extent(patch)
        return self._patches[name]

    def _mask_locked(self, name: str) -> np.ndarray:
        if name not in self._masks:
            mask = np.zeros(tuple(self.predictor.input_image.GetSize()), dtype=bool)
            patch = self._patch_locked(name)
            if patch is not None:
                start, logits = patch
                mask[tuple(slice(s, s + n) for s, n in zip(start, logits.shape))] = logits > 0
            mask.flags.writeable = False
            self._masks[name] = mask
        return self._masks[name]

    def _forget(self, name: str) -> None:
        self._masks.pop(name, None)
        self._patches.pop(name, None)
        self._extents.pop(name, None)

    def probabilities(self, name: str) -> np.ndarray:
        spec = self.object(name)
        with self.compute_lock:
            _tune_this_thread(self.predictor.device)
            if spec.name not in self.predictor.objects:
                return np.zeros(tuple(self.predictor.input_image.GetSize()), dtype=np.float32)
            return self.predictor.probabilities(spec.name)

    def clicked_objects(self) -> list[ObjectSpec]:
        """Objects with a mask to show: clicks, or a starting mask."""
        return [o for o in self.objects.values() if o.has_mask]

    def labelmap(self, box: tuple[Sequence[int], Sequence[int]] | None = None) -> np.ndarray:
        """All objects with clicks as one labelmap on the input grid, composed exactly as `infer` does
        (`infer.compose_patches`); `box` (start, shape): only that part of it."""
        from fastsam3d_cli.interactive.infer import compose_patches

        size = tuple(self.predictor.input_image.GetSize())
        objects = self.clicked_objects()
        if all(o.name in self._patches for o in objects):  # all cached (the usual case after a click): no
            patches = [(o.label, self._patches[o.name]) for o in objects]  # wait for other sessions' work
        else:
            with self.compute_lock:
                _tune_this_thread(self.predictor.device)
                patches = [(o.label, self._patch_locked(o.name)) for o in objects]
        return compose_patches(size, patches, box)

    def export_clicks(self) -> dict[str, Any]:
        """The session as a fastsam3d click file (space ijk, full precision): `fastsam3d infer` replays it."""
        from fastsam3d_cli.imaging.clickfile import ClickFile, ClickObject

        exported = [o for o in self.objects.values() if o.clicks and any(o.point_labels)]
        objects = tuple(ClickObject(o.name, o.label, tuple(p for p, _ in o.clicks), o.point_labels) for o in exported)
        return ClickFile("ijk", objects, f"session {self.id}", "fastsam3d").to_dict()

    def export_warnings(self) -> list[str]:
        """What the exported click file cannot replay (objects started from a mask)."""
        started = [o.name for o in self.objects.values() if o.initial is not None]
        if not started:
            return []
        return [f"objects started from a mask are not reproduced by the click file (it holds only their clicks; "
                f"one whose clicks are all excludes is left out): {', '.join(started)}"]

    def describe(self) -> dict[str, Any]:
        from fastsam3d_cli.interactive.infer import _grid  # noqa: PLC2701 - the input grid as infer's sidecar gives it

        return {"id": self.id, "name": self.display_name, "viewer_file": self.viewer_path.name,
                **_grid(self.predictor.input_image),
                "objects": [o.describe() for o in self.objects.values()]}

    def approximate_bytes(self) -> int:
        """A rough size of what the session keeps in memory (input, its float copy, crops, embeddings)."""
        image = self.predictor.input_image
        voxels = int(np.prod(image.GetSize()))
        crops = sum(len(self.predictor.object_state(n).crops) for n in self.predictor.objects)
        crop_bytes = self.predictor.crop_size ** 3 * 4
        masks = sum(m.nbytes for m in self._masks.values())
        masks += sum(p[1].nbytes for p in self._patches.values() if p is not None)
        return voxels * (image.GetSizeOfPixelComponent() + 4) + crops * 3 * crop_bytes + masks


def _extent(patch: Any) -> tuple[tuple[list[int], list[int]] | None, int]:
    """((start, shape) of the bounding box of a logits patch's mask, or None when empty; its voxel count)."""
    if patch is None:
        return None, 0
    start, logits = patch
    inside = logits > 0
    found = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if not found[0].size:
        return None, 0
    lo = [int(s + f[0]) for s, f in zip(start, found)]
    return (lo, [int(f[-1] + 1 - f[0]) for f in found]), int(inside.sum())


def _union_box(a: tuple[list[int], list[int]] | None,
               b: tuple[list[int], list[int]] | None) -> tuple[list[int], list[int]] | None:
    """The smallest (start, shape) box holding both boxes (None stands for an empty box)."""
    if a is None or b is None:
        return a if b is None else b
    lo = [min(x, y) for x, y in zip(a[0], b[0])]
    hi = [max(x + m, y + n) for x, m, y, n in zip(a[0], a[1], b[0], b[1])]
    return lo, [h - l for h, l in zip(hi, lo)]
