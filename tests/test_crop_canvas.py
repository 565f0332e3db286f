"""CropCanvas: the merged logits of an object's crops, checked against a brute-force merge after every kind
of change (crop added inside/outside the canvas, crop re-decoded, crop removed, crops reordered)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from fastsam3d_cli.interactive.crop_canvas import CropCanvas, shown_box
from fastsam3d_cli.imaging.crops import CropBox, extract_crop

SIZE = 12  # small crops keep the brute force fast; the canvas does not care about the crop size


@dataclass
class Crop:
    box: CropBox
    logits: np.ndarray | None
    version: int = 1


def _crop(start, rng, size=SIZE) -> Crop:
    return Crop(CropBox(tuple(start), size), rng.normal(size=(size,) * 3).astype(np.float32))


def brute_force(crops: list[Crop], shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, logits, owner) by scoring every covering crop at every voxel: deepest (Chebyshev to the
    centre), then nearest (Euclidean), then earliest."""
    decoded = [c for c in crops if c.logits is not None]
    lo = np.maximum(np.min([c.box.start for c in decoded], axis=0), 0)
    hi = np.minimum(np.max([c.box.stop for c in decoded], axis=0), shape)
    logits = np.full(tuple(hi - lo), np.nan, np.float32)
    owner = np.full(tuple(hi - lo), -1, np.int16)
    for voxel in np.ndindex(*logits.shape):
        position = np.asarray(voxel) + lo
        best = None
        for index, crop in enumerate(decoded):
            local = position - np.asarray(crop.box.start)
            if np.any(local < 0) or np.any(local >= crop.box.size):
                continue
            offset = np.abs(position - np.asarray(crop.box.center))
            key = (offset.max(), np.linalg.norm(offset), index)
            if best is None or key < best[0]:
                best = (key, index, crop.logits[tuple(local)])
        if best is not None:
            owner[voxel], logits[voxel] = best[1], best[2]
    return lo, logits, owner


def assert_matches(canvas: CropCanvas, crops: list[Crop], shape) -> None:
    lo, logits, owner = brute_force(crops, shape)
    np.testing.assert_array_equal(canvas.start, lo)
    np.testing.assert_array_equal(canvas.owner, owner)
    np.testing.assert_array_equal(canvas.logits, logits)


def test_the_voxel_takes_the_crop_it_lies_deepest_in():
    shape = (40, 8, 8)
    a = Crop(CropBox((0, -2, -2), SIZE), np.full((SIZE,) * 3, 1.0, np.float32))
    b = Crop(CropBox((6, -2, -2), SIZE), np.full((SIZE,) * 3, -1.0, np.float32))
    canvas = CropCanvas(shape).sync([a, b])
    assert tuple(canvas.start) == (0, 0, 0) and canvas.logits.shape == (18, 8, 8)
    # centres at 5.5 and 11.5 along axis 0: up to 8 belongs to a, from 9 to b — also near the other faces
    assert (canvas.logits[:9] == 1).all() and (canvas.logits[9:] == -1).all()


def test_every_incremental_change_equals_the_brute_force_merge():
    rng = np.random.default_rng(0)
    shape = (26, 22, 20)
    crops = [_crop((4, 4, 4), rng)]
    canvas = CropCanvas(shape).sync(crops)
    assert_matches(canvas, crops, shape)
    for start in ((10, 4, 4), (-2, 4, 4), (4, 10, 4), (10, 10, 9), (19, -4, 12)):  # grows the canvas
        crops.append(_crop(start, rng))
        assert_matches(canvas.sync(crops), crops, shape)
    crops[2].logits = rng.normal(size=(SIZE,) * 3).astype(np.float32)  # a crop re-decoded
    crops[2].version += 1
    assert_matches(canvas.sync(crops), crops, shape)
    unchanged = rng.normal(size=(SIZE,) * 3).astype(np.float32)  # new values without a new version are
    crops[1].logits = unchanged                                      # not picked up: versions are the contract
    assert not np.array_equal(canvas.sync(crops).logits, brute_force(crops, shape)[1])
    crops[1].version += 1
    assert_matches(canvas.sync(crops), crops, shape)
    del crops[0]  # removed: ownership rebuilt
    assert_matches(canvas.sync(crops), crops, shape)
    crops.insert(1, crops.pop())  # reordered: ties go to the earlier crop
    assert_matches(canvas.sync(crops), crops, shape)
    crops.append(Crop(CropBox((0, 0, 0), SIZE), None))  # not decoded yet: ignored
    assert_matches(canvas.sync(crops), crops, shape)


def test_region_is_the_canvas_cut_to_a_box():
    rng = np.random.default_rng(1)
    shape = (26, 22, 16)
    crops = [_crop(start, rng) for start in ((0, -2, -2), (6, -2, -2), (3, 5, -1))]
    canvas = CropCanvas(shape).sync(crops)
    for region in (CropBox((4, 1, -3), SIZE), CropBox((9, 6, 0), SIZE), CropBox((-5, -5, -5), SIZE)):
        lo, part = canvas.region(region)
        relative = CropBox(tuple(int(r - s) for r, s in zip(region.start, canvas.start)), SIZE)
        expected = extract_crop(canvas.logits, relative, fill=np.nan)
        ours = extract_crop(part, CropBox(tuple(int(r - o) for r, o in zip(region.start, lo)), SIZE), fill=np.nan)
        np.testing.assert_array_equal(ours, expected)
    assert canvas.region(CropBox((20, 0, 0), SIZE))[1] is None  # no crop reaches it


def test_shown_box_names_the_crop_shown_at_a_position():
    rng = np.random.default_rng(2)
    crops = [_crop((0, 0, 0), rng), _crop((6, 0, 0), rng)]
    shape = (30, 12, 12)
    canvas = CropCanvas(shape).sync(crops)
    boxes = canvas.boxes
    assert shown_box(boxes, [8.2, 5, 5], shape) == crops[0].box
    assert shown_box(boxes, [8.6, 5, 5], shape) == crops[1].box  # rounds to 9
    assert shown_box(boxes, [25, 5, 5], shape) is None  # in the volume, in no crop
    assert shown_box(boxes, [-3, 5, 5], shape) is None
    for voxel in np.ndindex(*canvas.owner.shape):  # the same answer as the canvas's ownership, everywhere
        owner = canvas.owner[voxel]
        assert shown_box(boxes, np.asarray(voxel) + canvas.start, shape) == (boxes[owner] if owner >= 0 else None)


@pytest.mark.parametrize("starts", [[(-20, 0, 0)], []])
def test_no_crop_in_the_volume_gives_no_canvas(starts):
    rng = np.random.default_rng(3)
    crops = [_crop(s, rng) for s in starts]
    canvas = CropCanvas((10, 10, 10)).sync(crops)
    assert canvas.logits is None and canvas.region(CropBox((0, 0, 0), SIZE))[1] is None
    assert shown_box([c.box for c in crops], [5, 5, 5], (10, 10, 10)) is None
