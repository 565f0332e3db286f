"""Predictor with injected models of known output: placement to the voxel, click feeding, encode caching,
crop extension and orientation invariance."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from fastsam3d_cli.imaging.clickfile import lps_to_ijk, to_lps
from fastsam3d_cli.imaging.crops import extract_crop, znormalize_foreground
from fastsam3d_cli.errors import BadInputError, UsageError
from fastsam3d_cli.imaging.volumes import array_ijk, image_from_array_ijk, same_grid
from fastsam3d_cli.interactive.predictor import Predictor
from infer_phantoms import (IDENTITY, RAS_STORED, TIE_FREE_SPACING, IntensityModel, SphereModel,
                                 expected_nearest_paste, make_image, phantom, rotation, voxel_centres_lps)

GEOMETRIES = {
    "oblique": dict(spacing=TIE_FREE_SPACING, direction=rotation((1.0, 2.0, 0.5), 27.0)),
    "flipped": dict(spacing=TIE_FREE_SPACING, direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)),
    "permuted": dict(spacing=TIE_FREE_SPACING, direction=(0, 0, 1.0, 1.0, 0, 0, 0, 1.0, 0)),
    "ras-stored": dict(spacing=(0.7, 0.7, 3.1), direction=RAS_STORED),
    "lps-stored": dict(spacing=(3.1, 1.3, 0.9), direction=IDENTITY),
}


def _volume(shape=(40, 36, 20), **geometry) -> sitk.Image:
    rng = np.random.default_rng(0)
    return make_image(rng.integers(1, 100, size=shape).astype(np.int16), origin=(12.0, -30.0, 7.5), **geometry)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_sphere_lands_on_the_right_voxels(name):
    image = _volume(**GEOMETRIES[name])
    click_lps = voxel_centres_lps(image)[17, 20, 9] + np.array([0.3, -0.2, 0.4])
    model = SphereModel(radius=10.0)
    predictor = Predictor(model, "cpu", max_crops=1)
    predictor.set_volume(image)
    mask = predictor.add_click(click_lps, space="lps", object="ball")
    assert mask.shape == tuple(image.GetSize()) and mask.dtype == bool

    crop = predictor.object_state("ball").crops[0]
    click_in_crop = lps_to_ijk(click_lps, predictor.canonical_grid)[0] - np.asarray(crop.box.start)
    np.testing.assert_allclose(model.decode_calls[0]["points"][0, 0].double().numpy(), click_in_crop, atol=1e-4)
    expected, ambiguous = expected_nearest_paste(
        image, predictor.canonical_grid, crop.box.start,
        lambda idx: np.linalg.norm(idx - click_in_crop, axis=-1) < 10.0)
    assert expected.sum() > 500
    assert np.array_equal(mask[~ambiguous], expected[~ambiguous])
    if name != "ras-stored":  # 0.7 mm vs 1.5 mm: all ties are excluded above; elsewhere there are none
        assert not ambiguous.any()
    # Physical check: the ball is centred on the click (1.5 mm grid → within a voxel).
    centroid = voxel_centres_lps(image)[mask].mean(axis=0)
    assert np.linalg.norm(centroid - click_lps) < 1.0
    out = predictor.mask_image("ball")
    assert same_grid(out, image) and out.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(array_ijk(out).astype(bool), mask)


def test_clicks_are_one_new_point_each_with_previous_logits():
    image = _volume(**GEOMETRIES["oblique"])
    centres = voxel_centres_lps(image)
    model = SphereModel()
    predictor = Predictor(model, "cpu", max_crops=1)
    predictor.set_volume(image)
    predictor.add_click(centres[17, 20, 9], space="lps", object="a")
    predictor.add_click(centres[20, 15, 9], include=False, space="lps", object="a")
    predictor.add_click(centres[15, 18, 10], space="lps", object="a")
    calls = model.decode_calls
    assert len(model.encoded) == 1  # encoded once, every further click is decoder-only
    assert [c["points"].shape for c in calls] == [(1, 1, 3)] * 3
    assert [int(c["labels"].item()) for c in calls] == [1, 0, 1]
    assert calls[0]["mask"].shape == (1, 1, 32, 32, 32) and torch.count_nonzero(calls[0]["mask"]) == 0
    box = predictor.object_state("a").crops[0].box
    for previous, call in zip(calls, calls[1:]):  # the previous step's low-res logits come back as the prompt
        sphere = SphereModel().full_logits(None, previous["points"], None)
        assert torch.equal(call["mask"], F.avg_pool3d(sphere, 4))
    np.testing.assert_allclose(calls[1]["points"][0, 0].double().numpy(),
                               lps_to_ijk(centres[20, 15, 9], predictor.canonical_grid)[0] - box.start, atol=1e-4)


@pytest.mark.parametrize("direction", [RAS_STORED, rotation((2.0, -1.0, 1.0), 33.0)])
def test_crop_is_centred_zero_padded_and_normalised_after_cropping(direction):
    """The crop the encoder gets = the whole volume resampled to 1.5 mm, cut out with zero padding, z-normalised."""
    image, _ = phantom(shape=(30, 30, 20), spacing=(2.0, 2.0, 3.0), direction=direction)
    model = IntensityModel()
    predictor = Predictor(model, "cpu", max_crops=1)
    predictor.set_volume(image)
    click = voxel_centres_lps(image)[15, 15, 10]
    predictor.add_click(click, space="lps", object="x")
    box = predictor.object_state("x").crops[0].box
    index = lps_to_ijk(click, predictor.canonical_grid)[0]
    assert np.all(np.abs(index - np.asarray(box.center)) <= 0.5)  # centred on the click
    canonical = array_ijk(predictor.canonical_volume(), np.float32)
    raw = extract_crop(canonical, box, fill=0.0)
    assert (raw == 0).sum() > 128 ** 3 // 2  # mostly zero padding: the volume is smaller than the crop
    np.testing.assert_allclose(model.encoded[0], znormalize_foreground(raw), atol=1e-5)
    foreground = model.encoded[0][raw > 0]
    assert abs(foreground.mean()) < 1e-4 and abs(foreground.std(ddof=1) - 1) < 1e-4


@pytest.mark.parametrize("direction", [RAS_STORED, rotation((1.0, 2.0, -1.0), 21.0)])
def test_a_crop_inside_the_volume_equals_the_whole_volume_resampled_and_cut(direction):
    """No zero padding: the crop's own resampling (axes reversed for SimpleITK) = resample everything, cut."""
    image, _ = phantom(shape=(104, 100, 70), spacing=(2.0, 2.0, 3.0), direction=direction,
                       semi_axes_mm=(60.0, 50.0, 40.0))
    model = IntensityModel()
    predictor = Predictor(model, "cpu", max_crops=1)
    predictor.set_volume(image)
    predictor.add_click(voxel_centres_lps(image)[52, 50, 35], space="lps", object="x")
    box = predictor.object_state("x").crops[0].box
    canonical = array_ijk(predictor.canonical_volume(), np.float32)
    assert all(s >= 0 for s in box.start) and all(e <= n for e, n in zip(box.stop, canonical.shape))
    raw = canonical[tuple(slice(s, e) for s, e in zip(box.start, box.stop))]
    np.testing.assert_allclose(model.encoded[0], znormalize_foreground(raw), atol=1e-5)


def test_embeddings_are_cached_per_crop_across_reset():
    image = _volume(**GEOMETRIES["flipped"])
    click = voxel_centres_lps(image)[17, 20, 9]
    model = SphereModel()
    predictor = Predictor(model, "cpu")
    predictor.set_volume(image)
    first = predictor.add_click(click, space="lps", object="a")
    predictor.reset_object("a")
    with pytest.raises(UsageError, match="no object called 'a'"):
        predictor.object_state("a")
    again = predictor.add_click(click, space="lps", object="a")
    assert len(model.encoded) == 1 and np.array_equal(first, again)
    assert [t["stage"] for t in predictor.timings].count("encode") == 1
    predictor.set_volume(image)  # a new volume clears the cache
    predictor.add_click(click, space="lps", object="a")
    assert len(model.encoded) == 2


def test_ijk_ras_and_lps_clicks_agree():
    image = _volume(**GEOMETRIES["oblique"])
    ijk = np.array([17.0, 20.0, 9.0])
    lps = to_lps([ijk], "ijk", image)[0]
    masks = []
    for space, point in (("ijk", ijk), ("lps", lps), ("ras", lps * [-1, -1, 1])):
        predictor = Predictor(SphereModel(), "cpu")
        predictor.set_volume(image)
        masks.append(predictor.add_click(point, space=space))
    assert masks[0].any() and all(np.array_equal(masks[0], m) for m in masks[1:])


def test_predictor_errors():
    predictor = Predictor(SphereModel(), "cpu")
    with pytest.raises(UsageError, match="no volume is set"):
        predictor.add_click([0, 0, 0])
    image = _volume(**GEOMETRIES["lps-stored"])
    predictor.set_volume(image)
    with pytest.raises(BadInputError, match=r"click 1 of object 'liver' \(ijk \[45, 1, 1\]\) is outside the volume"):
        predictor.add_click([45, 1, 1], space="ijk", object="liver")
    predictor.add_click([5, 5, 5], space="ijk", object="liver")
    with pytest.raises(BadInputError, match=r"click 2 of object 'liver' \(ijk \[-1, 1, 1\]\)"):
        predictor.add_click([-1, 1, 1], space="ijk", object="liver")  # numbered among the object's clicks
    assert len(predictor.object_state("liver").clicks) == 1  # the bad click was not added
    with pytest.raises(UsageError, match="unknown click space"):
        predictor.add_click([1, 1, 1], space="xyz")
    with pytest.raises(UsageError, match="--max-crops 0"):
        Predictor(SphereModel(), "cpu", max_crops=0)


def test_probabilities_follow_the_mask():
    image = _volume(**GEOMETRIES["lps-stored"])
    predictor = Predictor(SphereModel(), "cpu")
    predictor.set_volume(image)
    mask = predictor.add_click([17, 20, 9], space="ijk")
    probabilities = predictor.probabilities()
    assert probabilities.dtype == np.float32 and probabilities.shape == mask.shape
    assert probabilities[17, 20, 9] > 0.999 and probabilities[0, 0, 0] < 1e-3
    assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0
    agreement = ((probabilities > 0.5) == mask).mean()
    assert agreement > 0.99  # linear vs nearest resampling differ only on the outline


def _long_ellipsoid(max_crops: int):
    """A 300 mm long bright ellipsoid (200 voxels at 1.5 mm), i.e. much longer than one 128³ crop."""
    image, truth = phantom(shape=(110, 50, 44), spacing=(4.0, 4.0, 4.0), direction=RAS_STORED,
                           semi_axes_mm=(150.0, 60.0, 55.0))
    centre = voxel_centres_lps(image)[55, 25, 22]
    model = IntensityModel()
    predictor = Predictor(model, "cpu", max_crops=max_crops)
    predictor.set_volume(image)
    mask = predictor.add_click(centre, space="lps", object="long")
    return image, truth, centre, predictor, mask


def test_crop_extension_follows_an_object_larger_than_one_crop():
    image, truth, centre, predictor, mask = _long_ellipsoid(max_crops=8)
    report = predictor.object_report("long")
    assert [c["kind"] for c in report["crops"]] == ["primary", "extension", "extension"]
    starts = [c["start_ijk"] for c in report["crops"]]
    assert {tuple(np.subtract(s, starts[0])) for s in starts[1:]} == {(-64, 0, 0), (64, 0, 0)}
    for crop in report["crops"][1:]:  # each extension crop was prompted with a click inside the object
        synthetic = np.asarray(crop["synthetic_click_lps"])
        assert np.sum(((synthetic - centre) / [150.0, 60.0, 55.0]) ** 2) < 1.0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.95
    along = mask.any(axis=(1, 2))  # no gap at the seams
    first, last = np.flatnonzero(along)[[0, -1]]
    assert along[first:last + 1].all()
    assert abs((last - first + 1) * 4.0 - 300.0) <= 12.0


def test_extension_crops_reuse_the_clicks_inside_them():
    image, truth = phantom(shape=(110, 50, 44), spacing=(4.0, 4.0, 4.0), direction=RAS_STORED,
                           semi_axes_mm=(150.0, 60.0, 55.0))
    centres = voxel_centres_lps(image)
    clicks = [centres[44, 25, 22], centres[66, 25, 22]]  # ±44 mm from the centre along i (≈ ±29 crop voxels)
    predictor = Predictor(IntensityModel(), "cpu")
    predictor.set_volume(image)
    predictor.add_clicks(clicks, [1, 0], space="lps", object="long")
    report = predictor.object_report("long")
    assert [c["kind"] for c in report["crops"]] == ["primary", "extension", "extension"]
    assert report["crops"][0]["clicks"] == [1, 2]
    assert sorted(c["clicks"] for c in report["crops"][1:]) == [[1], [2]]  # each re-uses the click inside it
    assert all("synthetic_click_lps" not in c for c in report["crops"])
    decoded = [t["click"] for t in predictor.timings if t["stage"] == "decode"]
    assert sorted(decoded) == [1, 1, 2, 2]


def test_max_crops_one_cuts_at_the_crop_border():
    image, truth, centre, predictor, mask = _long_ellipsoid(max_crops=1)
    assert predictor.object_report("long")["crops_run"] == 1
    offset_mm = np.abs(voxel_centres_lps(image)[..., 0] - centre[0])
    assert not mask[offset_mm > 96.0 + 2.0].any()  # one crop spans 192 mm
    assert truth[offset_mm > 110.0].any()


def test_click_outside_the_crops_gets_its_own_crop_or_is_reported_unused():
    image, _ = phantom(shape=(110, 30, 30), spacing=(4.0, 4.0, 4.0), semi_axes_mm=(10.0, 10.0, 10.0))
    centres = voxel_centres_lps(image)
    points = [centres[20, 15, 15], centres[95, 15, 15]]  # 300 mm apart
    for max_crops, kinds, unused in ((8, ["primary", "click"], []), (1, ["primary"], [2])):
        predictor = Predictor(SphereModel(radius=8.0), "cpu", max_crops=max_crops)
        predictor.set_volume(image)
        mask = predictor.add_clicks(points, [1, 1], space="lps", object="two")
        report = predictor.object_report("two")
        assert [c["kind"] for c in report["crops"]] == kinds and report["unused_clicks"] == unused
        assert report["crops"][0]["clicks"] == [1]
        assert mask[20, 15, 15] and mask[95, 15, 15] == (max_crops > 1)


class SwitchModel(IntensityModel):
    """Intensity mask after an include click, nothing after an exclude click (to test pruning)."""

    def full_logits(self, embedding, points, point_labels) -> torch.Tensor:
        if int(point_labels[0, -1]) == 0:
            return torch.full_like(embedding, -5.0)
        return super().full_logits(embedding, points, point_labels)


def _decoded_crops(predictor: Predictor) -> list[tuple[int, ...]]:
    return [tuple(t["crop"]) for t in predictor.timings if t["stage"] == "decode"]


def test_a_further_click_decodes_only_the_crops_that_must_see_it():
    """After the first click the extension crops stay; a click re-decodes the crop shown where it lands
    (plus primary/click crops containing it), not every crop."""
    image, truth, centre, predictor, first_mask = _long_ellipsoid(max_crops=8)
    primary, low, high = (tuple(c.box.start) for c in predictor.object_state("long").crops)
    versions = [c.version for c in predictor.object_state("long").crops]
    centres = voxel_centres_lps(image)
    predictor.timings.clear()
    mask = predictor.add_click(centres[56, 25, 22], space="lps", object="long")  # deep in the primary
    assert _decoded_crops(predictor) == [primary]
    assert [c.version for c in predictor.object_state("long").crops] == [versions[0] + 1] + versions[1:]
    np.testing.assert_array_equal(mask, first_mask)  # the same (click-independent) prediction, same merge
    predictor.timings.clear()
    far = centres[100, 25, 22]  # +180 mm: in the far extension crop only
    predictor.add_click(far, space="lps", object="long")
    extension = predictor.object_state("long").crops[2 if high[0] > low[0] else 1]
    assert _decoded_crops(predictor) == [tuple(extension.box.start)] and extension.clicks == [2]
    report = predictor.object_report("long")
    assert report["crops_run"] == 3 and report["unused_clicks"] == []


def test_freeing_the_merged_cache_changes_nothing_but_memory():
    image, truth, centre, predictor, mask = _long_ellipsoid(max_crops=8)
    assert predictor.object_state("long").canvas is not None
    predictor.free_merged("long")
    assert predictor.object_state("long").canvas is None
    np.testing.assert_array_equal(predictor.mask("long"), mask)  # rebuilt on demand
    predictor.free_merged()
    again = predictor.add_click(voxel_centres_lps(image)[56, 25, 22], space="lps", object="long")
    np.testing.assert_array_equal(again, mask)


def test_an_extension_is_dropped_when_its_parent_no_longer_reaches_it():
    image, truth = phantom(shape=(110, 50, 44), spacing=(4.0, 4.0, 4.0), direction=RAS_STORED,
                           semi_axes_mm=(150.0, 60.0, 55.0))
    centres = voxel_centres_lps(image)
    predictor = Predictor(SwitchModel(), "cpu")
    predictor.set_volume(image)
    assert predictor.add_click(centres[55, 25, 22], space="lps", object="long").sum() > 0
    assert predictor.object_report("long")["crops_run"] == 3
    mask = predictor.add_click(centres[55, 25, 22], include=False, space="lps", object="long")
    assert [c["kind"] for c in predictor.object_report("long")["crops"]] == ["primary"]
    assert not mask.any()
    mask = predictor.add_click(centres[55, 25, 22], space="lps", object="long")  # and they come back
    assert predictor.object_report("long")["crops_run"] == 3
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.95


def test_a_click_outside_the_crops_at_max_crops_replaces_the_newest_extension():
    image, truth = phantom(shape=(150, 50, 44), spacing=(4.0, 4.0, 4.0), direction=RAS_STORED,
                           semi_axes_mm=(150.0, 60.0, 55.0))
    centres = voxel_centres_lps(image)
    predictor = Predictor(IntensityModel(), "cpu", max_crops=3)
    predictor.set_volume(image)
    predictor.add_click(centres[75, 25, 22], space="lps", object="long")
    before = [c["kind"] for c in predictor.object_report("long")["crops"]]
    assert before == ["primary", "extension", "extension"]
    predictor.add_click(centres[5, 25, 22], space="lps", object="long")  # 280 mm away: outside every crop
    report = predictor.object_report("long")
    assert [c["kind"] for c in report["crops"]] == ["primary", "click", "extension"]
    assert report["unused_clicks"] == [] and report["crops"][1]["clicks"] == [2]


def test_orientation_invariance_with_a_known_model():
    """The same anatomy stored with permuted/flipped axes gives the same physical mask (world clicks)."""
    image = _volume(shape=(40, 36, 22), spacing=TIE_FREE_SPACING, direction=RAS_STORED)
    reoriented = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True])
    centres_a = voxel_centres_lps(image)
    assert not np.allclose(np.asarray(reoriented.GetDirection()), np.asarray(image.GetDirection()))
    click = centres_a[17, 20, 9] + [0.2, 0.1, -0.3]
    masks = []
    for volume in (image, reoriented):
        predictor = Predictor(SphereModel(radius=9.0), "cpu")
        predictor.set_volume(volume)
        masks.append(predictor.mask_image() if predictor.add_click(click, space="lps") is not None else None)
    back = sitk.Resample(masks[1], image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert array_ijk(masks[0]).sum() > 300
    assert np.array_equal(array_ijk(masks[0]), array_ijk(back))
    # and the reoriented grid really holds the same physical points
    assert sorted(map(tuple, np.round(voxel_centres_lps(reoriented).reshape(-1, 3), 6)))[:5] == \
        sorted(map(tuple, np.round(centres_a.reshape(-1, 3), 6)))[:5]


def test_set_volume_accepts_paths(tmp_path):
    image = _volume(**GEOMETRIES["ras-stored"])
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(image, str(path))
    predictor = Predictor(SphereModel(), "cpu")
    predictor.set_volume(path)
    assert same_grid(predictor.input_image, image)
    assert {t["stage"] for t in predictor.timings} == {"read", "preprocess"}
    assert predictor.canonical_grid.GetSpacing() == (1.5, 1.5, 1.5)
    assert predictor.canonical_grid.GetDirection() == RAS_STORED
    assert image_from_array_ijk(np.zeros(image.GetSize(), np.uint8), image).GetSize() == image.GetSize()


def test_cpu_predictor_flushes_subnormal_floats():
    """Subnormal activations make CPU decoding ~10× slower; a CPU Predictor turns on flush-to-zero."""
    torch.set_flush_denormal(False)
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0
    Predictor(SphereModel(), "cpu")
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0


def test_crop_resampling_is_timed_as_preprocess_not_encode(monkeypatch):
    """Stages do not overlap: the crop's resampling and normalisation are "preprocess", never "encode" too."""
    import time

    import fastsam3d_cli.interactive.predictor as predictor_module

    resample = predictor_module.resample_onto

    def slow_resample(*args, **kwargs):
        time.sleep(0.3)
        return resample(*args, **kwargs)

    image = _volume(**GEOMETRIES["flipped"])
    predictor = Predictor(SphereModel(), "cpu")
    predictor.set_volume(image)
    monkeypatch.setattr(predictor_module, "resample_onto", slow_resample)
    predictor.add_click(voxel_centres_lps(image)[17, 20, 9], space="lps", object="a")
    stages = {t["stage"]: t["ms"] for t in predictor.timings if t["stage"] in ("preprocess", "encode")}
    assert stages["preprocess"] >= 300.0 and stages["encode"] < 300.0


def test_max_crops_bounds_the_extension():
    _, _, _, predictor, mask = _long_ellipsoid(max_crops=2)
    report = predictor.object_report("long")
    assert [c["kind"] for c in report["crops"]] == ["primary", "extension"]
    assert mask.any()


def test_from_checkpoint_encodes_once_and_decodes_per_click(tmp_path):
    from infer_phantoms import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "student.pth")
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", max_crops=1)
    assert predictor.model.config.name == "fastsam3d-tiny"
    image = _volume(**GEOMETRIES["flipped"])
    centres = voxel_centres_lps(image)
    predictor.set_volume(image)
    for click in (centres[17, 20, 9], centres[20, 18, 10]):
        mask = predictor.add_click(click, space="lps", object="a")
        assert mask.shape == tuple(image.GetSize())
    stages = [t["stage"] for t in predictor.timings]
    assert stages.count("encode") == 1 and stages.count("decode") == 2
