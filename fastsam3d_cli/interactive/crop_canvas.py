"""One object's crop logits merged on the canonical grid, kept up to date crop by crop.

Merge rule: each voxel takes the logits of the covering crop in which it lies deepest — nearest centre in
Chebyshev distance, ties broken by Euclidean distance, then by the earlier crop — so no voxel is predicted
near a crop border when another crop sees it from further inside.

Which crop owns a voxel depends only on the crops' boxes, so the ownership map is kept between clicks:
after a click only the re-decoded crops' own voxels are copied again (a few ms), instead of rebuilding
the canvas of up to eight 128³ crops (~10 ms per crop). Adding a crop updates ownership inside its box
only; removing or reordering crops rebuilds.
"""
from __future__ import annotations

import functools
from typing import Protocol, Sequence

import numpy as np

from fastsam3d_cli.imaging.crops import CropBox, crop_view_of


class DecodedCrop(Protocol):
    """What the canvas needs of a crop: its box, its upsampled logits and a counter bumped per decode."""

    box: CropBox
    logits: np.ndarray | None
    version: int


@functools.lru_cache(maxsize=2)
def depth_order(size: int) -> np.ndarray:
    """(size³) float32 ranking of a crop's voxels, smaller = deeper inside (read-only, cached).

    Chebyshev distance to the crop centre (size/2 − depth), plus 1e-3 × the Euclidean distance to break
    ties (Chebyshev values differ by ≥ 1; the term stays < 0.12 for 128³). The same for every crop, so it
    is computed once and sliced.
    """
    axis = np.abs(np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2.0))
    a, b, c = axis[:, None, None], axis[None, :, None], axis[None, None, :]
    order = np.maximum(np.maximum(a, b), c) + np.float32(1e-3) * np.sqrt(a * a + b * b + c * c)
    order.setflags(write=False)
    return order


def shown_box(boxes: Sequence[CropBox], index: Sequence[float], volume_shape: Sequence[int]) -> CropBox | None:
    """The box whose logits a `CropCanvas` of `boxes` shows at canonical position `index` (rounded).

    Pure geometry (the deepest box, the earlier one on ties): no canvas needs to be up to date. None when
    the voxel lies outside the volume or in no box.
    """
    voxel = np.rint(np.asarray(index, dtype=np.float64)).astype(int)
    if np.any(voxel < 0) or np.any(voxel >= np.asarray(volume_shape)):
        return None
    best: tuple[float, CropBox] | None = None
    for box in boxes:
        local = voxel - np.asarray(box.start)
        if np.any(local < 0) or np.any(local >= box.size):
            continue
        depth = float(depth_order(box.size)[tuple(local)])
        if best is None or depth < best[0]:
            best = (depth, box)
    return None if best is None else best[1]


class CropCanvas:
    """Merged logits (NaN where no crop reaches) over the crops' bounding box, clipped to the volume."""

    def __init__(self, volume_shape: Sequence[int]) -> None:
        self.volume_shape = np.asarray(volume_shape, dtype=int)
        self.start = np.zeros(3, dtype=int)  # canonical index of canvas voxel (0, 0, 0)
        self.logits: np.ndarray | None = None  # float32, NaN where uncovered
        self.owner: np.ndarray | None = None  # int16 index into `boxes`, -1 where uncovered
        self._distance: np.ndarray | None = None  # float32 depth measure of the owner (smaller = deeper)
        self.boxes: list[CropBox] = []
        self._versions: list[int] = []

    # ------------------------------------------------------------------------------ keeping in sync
    def sync(self, crops: Sequence[DecodedCrop]) -> "CropCanvas":
        """Bring the canvas up to date with `crops` (undecoded ones are ignored); returns self."""
        decoded = [c for c in crops if c.logits is not None]
        boxes = [c.box for c in decoded]
        if boxes != self.boxes:
            if self.logits is not None and self.boxes and boxes[:len(self.boxes)] == self.boxes:
                self._grow(*self._bounds(boxes))  # crops added: ownership changes inside their boxes only
                for box in boxes[len(self.boxes):]:
                    self._add_box(box)
                    self._versions.append(-1)
            else:
                self._rebuild(boxes)
        for index, crop in enumerate(decoded):
            if self._versions[index] != crop.version:
                self._copy_owned(index, crop.logits)  # type: ignore[arg-type]
                self._versions[index] = crop.version
        return self

    def _bounds(self, boxes: list[CropBox]) -> tuple[np.ndarray, np.ndarray]:
        if not boxes:
            return np.zeros(3, dtype=int), np.zeros(3, dtype=int)
        lo = np.maximum(np.min([b.start for b in boxes], axis=0), 0)
        hi = np.minimum(np.max([b.stop for b in boxes], axis=0), self.volume_shape)
        return lo, np.maximum(hi, lo)

    def _rebuild(self, boxes: list[CropBox]) -> None:
        """Ownership from scratch (crops removed or reordered); every crop's logits are copied again."""
        self.boxes, self._versions = [], []
        self.logits = self.owner = self._distance = None
        lo, hi = self._bounds(boxes)
        self.start = lo
        if boxes and np.all(hi > lo):
            shape = tuple(int(v) for v in hi - lo)
            self.logits = np.full(shape, np.nan, dtype=np.float32)
            self.owner = np.full(shape, -1, dtype=np.int16)
            self._distance = np.full(shape, np.inf, dtype=np.float32)
        for box in boxes:
            self._add_box(box)
            self._versions.append(-1)

    def _grow(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Enlarge the arrays to cover [lo, hi), keeping what they hold (a copy, no recomputation)."""
        old_lo, old_hi = self.start, self.start + np.asarray(self.logits.shape)  # type: ignore[union-attr]
        lo, hi = np.minimum(lo, old_lo), np.maximum(hi, old_hi)
        if np.array_equal(lo, old_lo) and np.array_equal(hi, old_hi):
            return
        shape = tuple(int(v) for v in hi - lo)
        inner = tuple(slice(int(a), int(b)) for a, b in zip(old_lo - lo, old_hi - lo))
        for name, fill in (("logits", np.nan), ("owner", -1), ("_distance", np.inf)):
            old = getattr(self, name)
            new = np.full(shape, fill, dtype=old.dtype)
            new[inner] = old
            setattr(self, name, new)
        self.start = lo

    def _add_box(self, box: CropBox) -> None:
        """Give the new box the voxels where it lies deeper than their current owner (logits copied later)."""
        index = len(self.boxes)
        self.boxes.append(box)
        if self.logits is None:
            return
        canvas_slices, crop_slices = crop_view_of(self.logits, self._relative(box))
        if any(s.stop <= s.start for s in canvas_slices):
            return
        distance = depth_order(box.size)[crop_slices]
        nearest = self._distance[canvas_slices]  # type: ignore[index]
        closer = distance < nearest
        nearest[closer] = distance[closer]
        self.owner[canvas_slices][closer] = index  # type: ignore[index]

    def _copy_owned(self, index: int, logits: np.ndarray) -> None:
        """Copy crop `index`'s logits into the voxels it owns."""
        if self.logits is None:
            return
        canvas_slices, crop_slices = crop_view_of(self.logits, self._relative(self.boxes[index]))
        owned = self.owner[canvas_slices] == index  # type: ignore[index]
        self.logits[canvas_slices][owned] = logits[crop_slices][owned]

    def _relative(self, box: CropBox) -> CropBox:
        return CropBox(tuple(int(s - o) for s, o in zip(box.start, self.start)), box.size)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------ reading
    def region(self, box: CropBox) -> tuple[np.ndarray, np.ndarray | None]:
        """(start, logits) of the canvas inside `box` (a view; NaN where no crop reaches), or (start, None)."""
        if self.logits is None:
            return np.zeros(3, dtype=int), None
        lo = np.maximum(self.start, np.maximum(box.start, 0))
        hi = np.minimum(self.start + np.asarray(self.logits.shape), box.stop)
        if np.any(hi <= lo):
            return lo, None
        return lo, self.logits[tuple(slice(int(a), int(b)) for a, b in zip(lo - self.start, hi - self.start))]
