"""World clicks (ras/lps) on NIfTI files land where the README puts them: `nii.affine @ [i, j, k, 1]`.

Files whose SimpleITK geometry differs from that affine are built with nibabel in code: a sheared sform
(mild: SimpleITK takes the qform rotation; strong: SimpleITK refuses and the nibabel fallback reader takes
the closest rotation), qform and sform that disagree, and a file without any orientation (both codes 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.imaging.volumes import read_image
from fastsam3d_cli.imaging.world import world_geometry
from fastsam3d_cli.interactive.infer import infer_file
from fastsam3d_cli.interactive.predictor import Predictor
from fastsam3d_cli.weights.loading import LoadedModel
from infer_phantoms import SphereModel, write_clicks

SHAPE = (40, 36, 24)
TARGET = np.array([21.0, 14.0, 9.0])  # the voxel every world click below names


def _nifti(path: Path, sform: np.ndarray | None, qform: np.ndarray | None, sform_code: int = 1,
           qform_code: int = 1) -> Path:
    data = np.random.default_rng(0).integers(1, 100, size=SHAPE).astype(np.int16)
    image = nib.Nifti1Image(data, None)
    image.set_qform(qform, code=qform_code)
    image.set_sform(sform, code=sform_code)
    nib.save(image, str(path))
    return path


def _affine(linear, offset=(-30.0, 25.0, -12.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = offset
    return affine


MILD_SHEAR = _affine([[2.0, 0.5, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])  # SimpleITK reads the qform's rotation
STRONG_SHEAR = _affine([[-1.5, 0.9, 0.3], [0.0, 1.5, 0.0], [0.2, 0.0, 2.5]])
PLAIN = _affine(np.diag([-2.0, 2.0, 3.0]))


def _ras(affine: np.ndarray, ijk: np.ndarray) -> list[float]:
    return (affine[:3, :3] @ ijk + affine[:3, 3]).tolist()


def _predictor() -> Predictor:
    return Predictor(SphereModel(radius=6.0), "cpu", max_crops=1)


def _fake() -> LoadedModel:
    return LoadedModel(SphereModel(radius=6.0), "sphere", Path("/nonexistent/fake.pth"), "0" * 64, None,
                       torch.device("cpu"), "none", 0.0)


@pytest.mark.parametrize("name, sform, qform_code", [("mild", MILD_SHEAR, 1), ("strong", STRONG_SHEAR, 0)])
@pytest.mark.parametrize("space", ["ras", "lps"])
def test_sheared_nifti_world_click_lands_on_the_affine_voxel(tmp_path, name, sform, qform_code, space):
    path = _nifti(tmp_path / f"{name}.nii.gz", sform, sform, qform_code=qform_code)
    world = world_geometry(path, read_image(path))
    assert world.ras_from_ijk is not None and world.source == "sform"
    assert any("sheared" in note for note in world.notes)
    point = np.array(_ras(sform, TARGET)) * ([1, 1, 1] if space == "ras" else [-1, -1, 1])
    predictor = _predictor()
    predictor.set_volume(path)
    mask = predictor.add_click(point.tolist(), space=space, object="ball")
    click = predictor.object_report("ball")["clicks"][0]
    np.testing.assert_allclose(click["ijk"], TARGET, atol=1e-3)
    np.testing.assert_allclose(click[space], point, atol=1e-3)  # reads back as given
    # The ball the model drew around the click is centred on that voxel (not ~6 voxels away).
    centroid = np.argwhere(mask).mean(axis=0)
    assert np.linalg.norm(centroid - TARGET) < 1.0


def test_sheared_nifti_infer_warns_in_the_sidecar(tmp_path):
    path = _nifti(tmp_path / "mild.nii.gz", MILD_SHEAR, MILD_SHEAR)
    clicks = write_clicks(tmp_path / "c.json", "ras", [{"name": "ball", "label": 1,
                                                        "points": [_ras(MILD_SHEAR, TARGET)], "point_labels": [1]}])
    result = infer_file(path, clicks, tmp_path / "out.nii.gz", loaded=_fake(), max_crops=1)
    np.testing.assert_allclose(result["objects"][0]["clicks"][0]["ijk"], TARGET, atol=1e-3)
    assert any("sheared" in w and "sform" in w for w in result["warnings"])
    labels = np.asarray(nib.load(str(tmp_path / "out.nii.gz")).dataobj)
    assert np.linalg.norm(np.argwhere(labels == 1).mean(axis=0) - TARGET) < 1.0


def test_qform_and_sform_disagree_clicks_follow_the_sform_and_the_warning_says_so(tmp_path):
    qform = _affine(np.diag([-2.0, 2.0, 3.0]), offset=(10.0, 5.0, 0.0))  # 20 mm apart: the two name other voxels
    path = _nifti(tmp_path / "both.nii.gz", PLAIN, qform)
    clicks = write_clicks(tmp_path / "c.json", "ras", [{"name": "ball", "label": 1,
                                                        "points": [_ras(PLAIN, TARGET)], "point_labels": [1]}])
    result = infer_file(path, clicks, tmp_path / "out.nii.gz", loaded=_fake(), max_crops=1)
    np.testing.assert_allclose(result["objects"][0]["clicks"][0]["ijk"], TARGET, atol=1e-3)
    np.testing.assert_allclose(result["objects"][0]["clicks"][0]["ras"], _ras(PLAIN, TARGET), atol=1e-3)
    warning = next(w for w in result["warnings"] if "qform and sform differ" in w)
    assert "placed with the sform" in warning and "sform_code to 0" in warning and "ijk" in warning
    labels = np.asarray(nib.load(str(tmp_path / "out.nii.gz")).dataobj)
    assert np.linalg.norm(np.argwhere(labels == 1).mean(axis=0) - TARGET) < 1.0
    # The output keeps both transforms and their codes.
    header = nib.load(str(tmp_path / "out.nii.gz")).header
    np.testing.assert_allclose(header.get_sform(), PLAIN, atol=1e-5)
    np.testing.assert_allclose(header.get_qform(), qform, atol=1e-5)


def test_only_the_qform_set_clicks_follow_the_qform(tmp_path):
    qform = _affine(np.diag([-2.0, 2.0, 3.0]), offset=(10.0, 5.0, 0.0))
    path = _nifti(tmp_path / "q.nii.gz", PLAIN, qform, sform_code=0)
    predictor = _predictor()
    predictor.set_volume(path)
    predictor.add_click(_ras(qform, TARGET), space="ras", object="ball")
    np.testing.assert_allclose(predictor.object_report("ball")["clicks"][0]["ijk"], TARGET, atol=1e-3)
    assert not predictor.world.notes


@pytest.mark.parametrize("space", ["ras", "lps"])
def test_no_orientation_refuses_world_clicks_and_writes_nothing(tmp_path, space):
    path = _nifti(tmp_path / "bare.nii.gz", PLAIN, PLAIN, sform_code=0, qform_code=0)
    clicks = write_clicks(tmp_path / "c.json", space, [{"name": "ball", "label": 1, "points": [[1.0, 2.0, 3.0]],
                                                        "point_labels": [1]}])
    with pytest.raises(BadInputError) as error:
        infer_file(path, clicks, tmp_path / "out.nii.gz", loaded=_fake(), max_crops=1)
    message = error.value.one_line()
    assert "no orientation (qform_code = sform_code = 0)" in message and f"{space} clicks" in message
    assert "ijk" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.nii.gz", "c.json"]
    # The Predictor API refuses too, for a path and for an image read before.
    for volume in (path, read_image(path)):
        predictor = _predictor()
        predictor.set_volume(volume)
        with pytest.raises(BadInputError, match="no orientation"):
            predictor.add_click([1.0, 2.0, 3.0], space=space, object="ball")


def test_no_orientation_ijk_clicks_still_work(tmp_path):
    path = _nifti(tmp_path / "bare.nii.gz", PLAIN, PLAIN, sform_code=0, qform_code=0)
    clicks = write_clicks(tmp_path / "c.json", "ijk", [{"name": "ball", "label": 1, "points": [TARGET.tolist()],
                                                        "point_labels": [1]}])
    result = infer_file(path, clicks, tmp_path / "out.nii.gz", loaded=_fake(), max_crops=1)
    np.testing.assert_allclose(result["objects"][0]["clicks"][0]["ijk"], TARGET, atol=1e-6)
    assert any("no orientation" in w for w in result["warnings"])
    assert json.loads((tmp_path / "out.json").read_text())["objects"][0]["voxels"] > 0


def test_plain_nifti_uses_the_image_geometry_unchanged(tmp_path):
    path = _nifti(tmp_path / "plain.nii.gz", PLAIN, PLAIN)
    world = world_geometry(path, read_image(path))
    assert world.ras_from_ijk is None and world.refusal is None and not world.notes


def test_benchmark_end_to_end_checks_clicks_the_way_infer_places_them(tmp_path):
    from fastsam3d_cli.benchmark.speed import _check_end_to_end_inputs

    bare = _nifti(tmp_path / "bare.nii.gz", PLAIN, PLAIN, sform_code=0, qform_code=0)
    ras = write_clicks(tmp_path / "c.json", "ras", [{"name": "ball", "label": 1, "points": [[1.0, 2.0, 3.0]],
                                                     "point_labels": [1]}])
    with pytest.raises(BadInputError, match="no orientation"):
        _check_end_to_end_inputs(bare, ras)
    sheared = _nifti(tmp_path / "mild.nii.gz", MILD_SHEAR, MILD_SHEAR)
    corner = write_clicks(tmp_path / "corner.json", "ras", [{"name": "ball", "label": 1, "point_labels": [1],
                                                             "points": [_ras(MILD_SHEAR, np.array([39.4, 35.4, 0]))]}])
    _check_end_to_end_inputs(sheared, corner)  # inside through the file's affine (a voxel of the far corner)
