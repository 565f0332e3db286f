"""`infer_file`, file to file: output geometry (NIfTI qform/sform, oblique, flipped, anisotropic, LPS/RAS-stored,
several dtypes and formats), labelmap values, sidecar, preview, probabilities, orientation invariance with the
real model path, and nothing left behind on Ctrl-C."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.imaging.volumes import array_ijk
from fastsam3d_cli.interactive.infer import default_output_path, infer_file, sidecar_path
from fastsam3d_cli.weights.loading import LoadedModel, load_inference_model
from infer_phantoms import (IDENTITY, RAS_STORED, TIE_FREE_SPACING, SphereModel, make_image,
                                 make_tiny_checkpoint, phantom, rotation, voxel_centres_lps, write, write_clicks)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pth")


@pytest.fixture(scope="module")
def tiny_loaded(tiny) -> LoadedModel:
    return load_inference_model(checkpoint=tiny, device="cpu")


def _fake(model=None) -> LoadedModel:
    return LoadedModel(model or SphereModel(radius=8.0), "sphere", Path("/nonexistent/fake.pth"), "0" * 64, None,
                       __import__("torch").device("cpu"), "none", 0.0)


def _centre_click(image: sitk.Image, path: Path, space: str = "ras", **obj) -> Path:
    centre = voxel_centres_lps(image)[tuple(n // 2 for n in image.GetSize())]
    point = centre * [-1, -1, 1] if space == "ras" else centre
    return write_clicks(path, space, [{"name": "organ", "label": 1, "points": [point.tolist()],
                                      "point_labels": [1], **obj}])


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


CASES = {
    "nifti-ras-int32-3mm": ("v.nii.gz", dict(spacing=(3.0, 3.0, 3.0), direction=RAS_STORED), np.int32),
    "nifti-lps-int16-aniso": ("v.nii.gz", dict(spacing=(0.8, 1.7, 4.0), direction=IDENTITY), np.int16),
    "nifti-oblique-float32": ("v.nii", dict(spacing=TIE_FREE_SPACING, direction=rotation((1, 1, 0), 30)), np.float32),
    "nifti-flipped-float64": ("v.nii.gz", dict(spacing=(2.0, 1.0, 2.5), direction=(1.0, 0, 0, 0, -1.0, 0, 0, 0, -1.0)),
                              np.float64),
    "nrrd-permuted-int16": ("v.nrrd", dict(spacing=(1.2, 2.2, 1.9), direction=(0, 1.0, 0, 0, 0, -1.0, 1.0, 0, 0)),
                            np.int16),
    "mha-oblique-uint8": ("v.mha", dict(spacing=(2.0, 2.0, 2.0), direction=rotation((0, 0, 1), -40)), np.uint8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_has_the_input_geometry_exactly(case, tmp_path, tiny_loaded):
    name, geometry, dtype = CASES[case]
    image, _ = phantom(shape=(36, 30, 26), origin=(-12.5, 40.0, 101.0), dtype=dtype, **geometry)
    volume = write(image, tmp_path / name)
    clicks = _centre_click(image, tmp_path / "clicks.json")
    result = infer_file(volume, clicks, loaded=tiny_loaded)
    output = Path(result["outputs"]["labelmap"])
    assert output == default_output_path(volume) == tmp_path / "v_mask.nii.gz"
    written = sitk.ReadImage(str(output))
    original = sitk.ReadImage(str(volume))
    assert written.GetSize() == original.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), rtol=0, atol=1e-6)
    assert written.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(array_ijk(written))) <= {0, 1}
    if name.startswith("v.nii"):  # the input's NIfTI header geometry is copied field by field
        source, target = nib.load(str(volume)).header, nib.load(str(output)).header
        for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                      "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim"):
            assert np.array_equal(source[field], target[field]), field
        assert target.get_data_dtype() == np.uint8 and target.get_data_shape() == source.get_data_shape()
    assert result["input"]["pixel_type"] == original.GetPixelIDTypeAsString()


def test_qform_and_sform_that_differ_are_both_kept(tmp_path, tiny_loaded):
    qform = np.array([[-2.0, 0, 0, 30], [0, -2.0, 0, 20], [0, 0, 3.0, -40], [0, 0, 0, 1]])
    sform = qform.copy()
    sform[:3, 3] += [5.0, -3.0, 2.0]  # a registration left in the sform only
    data = np.zeros((30, 28, 20), np.int16)
    data[8:22, 8:20, 5:15] = 300
    nii = nib.Nifti1Image(data, None)
    nii.set_qform(qform, code=1)
    nii.set_sform(sform, code=2)
    volume = tmp_path / "qs.nii.gz"
    nib.save(nii, str(volume))
    clicks = write_clicks(tmp_path / "c.json", "ijk", [{"name": "box", "label": 1, "points": [[15, 14, 10]],
                                                        "point_labels": [1]}])
    result = infer_file(volume, clicks, tmp_path / "out.nii.gz", loaded=tiny_loaded)
    header = nib.load(str(tmp_path / "out.nii.gz")).header
    np.testing.assert_array_equal(header.get_qform(), qform)
    np.testing.assert_array_equal(header.get_sform(), sform)
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 2)
    assert any("qform and sform differ" in w for w in result["warnings"])
    assert result["outputs"]["sidecar"] == str(tmp_path / "out.json")


def test_non_orthonormal_nifti_is_read_with_nibabel_and_its_header_kept(tmp_path, tiny_loaded):
    sheared = np.array([[2.0, 0.4, 0, 10], [0, 2.0, 0, -5], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    nii = nib.Nifti1Image(np.full((24, 24, 16), 50, np.int16), None)
    nii.set_qform(None, code=0)
    nii.set_sform(sheared, code=2)
    volume = tmp_path / "shear.nii.gz"
    nib.save(nii, str(volume))
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(volume))  # SimpleITK refuses it ...
    clicks = write_clicks(tmp_path / "c.json", "ijk", [{"name": "a", "label": 1, "points": [[12, 12, 8]],
                                                        "point_labels": [1]}])
    infer_file(volume, clicks, loaded=tiny_loaded)  # ... the nibabel fallback reads it
    header = nib.load(str(tmp_path / "shear_mask.nii.gz")).header
    np.testing.assert_array_equal(header.get_sform(), nib.load(str(volume)).header.get_sform())
    np.testing.assert_allclose(header.get_sform(), sheared, atol=1e-6)  # stored as float32
    assert header.get_data_shape() == (24, 24, 16)


def test_known_model_file_to_file_labels_overlap_and_uint16(tmp_path):
    """Two balls (radius 8 crop voxels = 12 mm) 15 mm apart: each voxel goes to the nearer click (higher logit)."""
    image = make_image(np.full((40, 30, 30), 10, np.int16), spacing=(1.0, 1.0, 1.0), direction=RAS_STORED)
    volume = write(image, tmp_path / "v.nii.gz")
    a, b = [10.0, 15.0, 15.0], [25.0, 15.0, 15.0]
    clicks = write_clicks(tmp_path / "c.json", "ijk", [
        {"name": "first", "label": 7, "points": [a], "point_labels": [1]},
        {"name": "second", "label": 300, "points": [b], "point_labels": [1]}])
    result = infer_file(volume, clicks, loaded=_fake(), probabilities=tmp_path / "probs")
    labels = array_ijk(sitk.ReadImage(str(tmp_path / "v_mask.nii.gz")))
    assert labels.dtype == np.uint16 and result["labelmap_dtype"] == "uint16"
    assert labels[10, 15, 15] == 7 and labels[25, 15, 15] == 300 and labels[0, 0, 0] == 0
    assert labels[16, 15, 15] == 7 and labels[19, 15, 15] == 300  # overlap: the nearer ball wins
    centres = np.stack(np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij"), -1)
    distance_a = np.linalg.norm(centres - a, axis=-1)
    assert (labels[distance_a < 10.5] != 0).all()  # 12 mm ball, minus a voxel of discretisation
    objects = {o["name"]: o for o in result["objects"]}
    assert objects["first"]["voxels"] == int((labels == 7).sum()) and objects["second"]["voxels"] == int((labels == 300).sum())
    assert objects["first"]["volume_ml"] == pytest.approx((labels == 7).sum() / 1000.0, abs=1e-4)
    probability = array_ijk(sitk.ReadImage(str(tmp_path / "probs" / "v_mask_prob_300_second.nii.gz")))
    assert probability.dtype == np.float32 and probability[25, 15, 15] > 0.99 and probability[0, 0, 0] < 1e-3
    assert nib.load(str(tmp_path / "probs" / "v_mask_prob_7_first.nii.gz")).header["sform_code"] == \
        nib.load(str(volume)).header["sform_code"]


def test_sidecar_records_what_was_done(tmp_path, tiny, tiny_loaded):
    image, _ = phantom(spacing=(2.0, 2.0, 3.0))
    volume = write(image, tmp_path / "ct.nii.gz")
    clicks = write_clicks(tmp_path / "c.json", "ijk", [{"name": "organ", "label": 2, "points": [[24, 20, 16], [30, 20, 16]],
                                                        "point_labels": [1, 0]}])
    result = infer_file(volume, clicks, tmp_path / "seg.nii.gz", loaded=tiny_loaded)
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar == json.loads(json.dumps(result))
    assert sidecar["input"]["sha256"] == hashlib.sha256(volume.read_bytes()).hexdigest()
    assert sidecar["clicks_file"] == {"path": str(clicks), "sha256": hashlib.sha256(clicks.read_bytes()).hexdigest(),
                                      "format": "fastsam3d", "space": "ijk"}
    assert sidecar["model"]["preset"] == "fastsam3d-tiny"
    assert sidecar["model"]["checkpoint_sha256"] == hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert sidecar["device"] == "cpu" and sidecar["attention"] in ("exact", "sdpa")
    (obj,) = sidecar["objects"]
    assert [c["ijk"] for c in obj["clicks"]] == [[24.0, 20.0, 16.0], [30.0, 20.0, 16.0]]
    lps = image.TransformContinuousIndexToPhysicalPoint([30.0, 20.0, 16.0])
    np.testing.assert_allclose(obj["clicks"][1]["lps"], lps, atol=1e-4)
    np.testing.assert_allclose(obj["clicks"][1]["ras"], [-lps[0], -lps[1], lps[2]], atol=1e-4)
    assert [c["include"] for c in obj["clicks"]] == [True, False]
    assert obj["crops_run"] == sidecar["crops_run"] == len(obj["crops"]) >= 1
    assert obj["crops"][0]["kind"] == "primary" and obj["crops"][0]["size"] == 128
    labels = array_ijk(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))
    assert obj["voxels"] == int((labels == 2).sum())
    assert obj["volume_ml"] == pytest.approx(obj["voxels"] * 2 * 2 * 3 / 1000.0, abs=1e-4)
    timings = sidecar["timings_ms"]
    for stage in ("read", "preprocess", "encode", "decode", "paste", "write", "after_model_load"):
        assert timings[stage] >= 0.0
    assert [(d["object"], d["click"]) for d in timings["decode_per_click"]][:2] == [("organ", 1), ("organ", 2)]
    assert len(timings["encode_per_crop"]) == obj["crops_run"]
    assert sidecar["pipeline"]["canonical_grid"]["spacing"] == [1.5, 1.5, 1.5]


def test_preview_png_draws_outline_and_clicks(tmp_path):
    import matplotlib.image

    image, _ = phantom(shape=(40, 40, 30), spacing=(2.0, 2.0, 2.0))
    volume = write(image, tmp_path / "v.nii.gz")
    clicks = write_clicks(tmp_path / "c.json", "ijk", [
        {"name": "liver", "label": 1, "points": [[20, 20, 15], [26, 20, 15]], "point_labels": [1, 0]},
        {"name": "spleen", "label": 2, "points": [[8, 8, 8]], "point_labels": [1]}])
    infer_file(volume, clicks, loaded=_fake(), preview=tmp_path / "p.png")
    picture = matplotlib.image.imread(str(tmp_path / "p.png"))
    assert picture.shape[0] > 400 and picture.shape[1] > 700  # 2 rows × 3 panels
    rgb = (picture[..., :3] * 255).round().astype(int)

    def has(colour: str) -> bool:
        target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        return bool((np.abs(rgb - target).sum(axis=-1) < 40).any())

    assert has("#22dd22") and has("#ff3030")  # include and exclude clicks
    assert has("#ffd000") and has("#00c8ff")  # the two objects' outlines


def test_orientation_invariance_real_model(tmp_path, tiny_loaded):
    """The same anatomy stored with permuted and flipped axes, clicks in world mm → the same physical mask."""
    image, _ = phantom(shape=(40, 34, 28), spacing=TIE_FREE_SPACING, direction=RAS_STORED)
    reoriented = sitk.Flip(sitk.PermuteAxes(image, [1, 2, 0]), [False, True, True])
    clicks = _centre_click(image, tmp_path / "c.json", space="ras")
    masks = []
    for name, volume in (("a", image), ("b", reoriented)):
        path = write(volume, tmp_path / f"{name}.nii.gz")
        infer_file(path, clicks, loaded=tiny_loaded)
        masks.append(sitk.ReadImage(str(tmp_path / f"{name}_mask.nii.gz")))
    back = array_ijk(sitk.Resample(masks[1], masks[0], sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    first = array_ijk(masks[0])
    assert first.any() and not first.all()
    assert (back == first).mean() > 0.999  # identical up to float rounding in the two resamplings


def test_four_d_volume_needs_a_channel(tmp_path, tiny_loaded):
    data = np.zeros((24, 20, 16, 2), np.int16)
    data[..., 1] = 100
    nii = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    volume = tmp_path / "mr.nii.gz"
    nib.save(nii, str(volume))
    clicks = write_clicks(tmp_path / "c.json", "ijk", [{"name": "a", "label": 1, "points": [[12, 10, 8]],
                                                        "point_labels": [1]}])
    with pytest.raises(BadInputError, match="is 4D with 2 channels — choose one with --channel N"):
        infer_file(volume, clicks, loaded=tiny_loaded)
    assert _files(tmp_path) == {"mr.nii.gz", "c.json"}
    infer_file(volume, clicks, loaded=tiny_loaded, channel=1)
    output = nib.load(str(tmp_path / "mr_mask.nii.gz"))
    assert output.shape == (24, 20, 16)
    np.testing.assert_array_equal(output.affine, nii.affine)


@pytest.mark.parametrize("stage", ["segment", "write_labelmap", "preview"])
def test_interrupt_leaves_no_partial_file(stage, tmp_path, monkeypatch):
    image, _ = phantom()
    volume = write(image, tmp_path / "v.nii.gz")
    clicks = _centre_click(image, tmp_path / "c.json")
    before = _files(tmp_path)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if stage == "segment":
        monkeypatch.setattr("fastsam3d_cli.interactive.predictor.Predictor.add_clicks", interrupt)
    elif stage == "write_labelmap":
        import fastsam3d_cli.interactive.infer as infer_module

        real = infer_module.write_volume

        def write_then_interrupt(array, image, header, path):
            real(array, image, header, path)  # the temporary file exists at this point
            assert path.exists() and ".partial" in path.name
            raise KeyboardInterrupt

        monkeypatch.setattr(infer_module, "write_volume", write_then_interrupt)
    else:
        monkeypatch.setattr("fastsam3d_cli.interactive.preview.write_preview", interrupt)
    with pytest.raises(KeyboardInterrupt):
        infer_file(volume, clicks, loaded=_fake(), preview=tmp_path / "p.png", probabilities=tmp_path / "probs")
    assert _files(tmp_path) == before


def test_output_paths():
    assert default_output_path(Path("/d/ct.nii.gz")) == Path("/d/ct_mask.nii.gz")
    assert default_output_path(Path("/d/scan.v2.nrrd")) == Path("/d/scan.v2_mask.nii.gz")
    assert sidecar_path(Path("/d/ct_mask.nii.gz")) == Path("/d/ct_mask.json")
    assert sidecar_path(Path("/d/liver.mha")) == Path("/d/liver.json")


def test_real_ct_fixture(tmp_path, tiny_loaded):
    """The small real CT (int16, RAS-stored, 3 mm) runs file to file with the geometry kept."""
    data_dir = Path(os.environ.get("FASTSAM3D_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    ct = data_dir / "fixtures" / "abdomen_ct_sm.nii.gz"
    if not ct.is_file():
        pytest.skip(f"{ct} not available")
    image = sitk.ReadImage(str(ct))
    clicks = _centre_click(image, tmp_path / "c.json", space="lps")
    result = infer_file(ct, clicks, tmp_path / "ct_mask.nii.gz", loaded=tiny_loaded, max_crops=2)
    written = sitk.ReadImage(result["outputs"]["labelmap"])
    assert written.GetSize() == image.GetSize() and written.GetDirection() == image.GetDirection()
    assert written.GetOrigin() == image.GetOrigin() and written.GetSpacing() == image.GetSpacing()
