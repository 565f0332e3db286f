"""Proof of geometry for `infer` on DICOM: the DICOM-SEG (read back with highdicom, positions taken from the SEG's
own per-frame headers), the NIfTI labelmap (positions from nibabel's affine) and the STL meshes put the same
voxels at the same physical points — for the real validation series, a flipped-axis and an oblique series
written from it. A fake model (a ball around each click) stands in for the network: its output is known."""
from __future__ import annotations

import json
from typing import Any
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_builders import rotation, source_slices, write_variant
from fastsam3d_cli.imaging.dicom import read_dicom
from fastsam3d_cli.imaging.dicom_seg import AlgorithmSpec, SegmentSpec, write_dicom_seg
from fastsam3d_cli.imaging.mesh import read_obj, read_stl
from fastsam3d_cli.imaging.volumes import array_ijk, resample_like
from fastsam3d_cli.interactive.infer import infer_file
from fastsam3d_cli.weights.loading import LoadedModel
from infer_phantoms import SphereModel

hd = pytest.importorskip("highdicom")
pytest.importorskip("skimage")
CROP = (150, 310, 120, 330)  # rows × columns kept in the variants: 160 × 210 pixels
CLICKS_LPS = {"liver": (5, [-120.0, -250.0, -790.0]), "lesion": (2, [-60.0, -200.0, -782.0])}


def _fake() -> LoadedModel:
    import torch

    return LoadedModel(SphereModel(radius=8.0), "sphere", Path("/nonexistent/fake.pth"), "0" * 64, None,
                       torch.device("cpu"), "none", 0.0)


@pytest.fixture(scope="module")
def series_dir(data_dir) -> Path:
    path = data_dir / "validation" / "abdomen_ct_dicom"
    if not path.is_dir():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="module")
def slices(series_dir):
    return source_slices(series_dir)


# ----------------------------------------------------------------------------------------- readers under test
def _points(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _rounded(points: np.ndarray) -> np.ndarray:
    """Points in a canonical order (lexicographic on 0.1 mm rounding) for comparisons with a tolerance."""
    order = np.lexsort(np.round(points, 1).T[::-1])
    return points[order]


def assert_same_points(a: dict[int, np.ndarray], b: dict[int, np.ndarray], tolerance_mm: float = 0.01) -> None:
    """Same labels, same number of points, and every point of `a` within `tolerance_mm` of one of `b` (DICOM
    stores positions as decimal strings, so exact equality is not expected; a voxel is ~1 mm)."""
    from scipy.spatial import cKDTree

    assert set(a) == set(b)
    for label in a:
        assert len(a[label]) == len(b[label]) > 0, label
        distance, _ = cKDTree(b[label]).query(a[label])
        assert distance.max() < tolerance_mm, (label, distance.max())


def nifti_points(path: Path) -> tuple[dict[int, set], np.ndarray, np.ndarray]:
    """{label: LPS points of its voxels} from nibabel (RAS affine → LPS), the data and the LPS affine."""
    nii = nib.load(str(path))
    data = np.asarray(nii.dataobj)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ nii.affine
    return ({int(v): _rounded(_points(np.argwhere(data == v).astype(float), affine))
             for v in np.unique(data) if v}, data, affine)


def seg_points(path: Path) -> tuple[dict[int, set], Any]:
    """{label: LPS points} from a DICOM-SEG: per-frame ImagePositionPatient + shared orientation and spacing."""
    seg = hd.seg.segread(str(path))
    collected: dict[int, list[np.ndarray]] = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    row_dir, col_dir = orientation[:3], orientation[3:]
    row_spacing, col_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    label_of = {int(s.SegmentNumber): int(str(s.SegmentDescription).split()[-1]) for s in seg.SegmentSequence}
    frames = seg.pixel_array
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        rows, cols = np.nonzero(frames[index])
        points = ipp + np.outer(cols * col_spacing, row_dir) + np.outer(rows * row_spacing, col_dir)
        collected.setdefault(label_of[number], []).append(points)
    return {label: np.concatenate(parts) for label, parts in collected.items()}, seg


def check_mesh(path: Path, data: np.ndarray, affine: np.ndarray, label: int) -> None:
    """Every vertex sits halfway between a voxel of the object and one outside it; the surface is closed,
    outward and encloses about the voxels' volume."""
    if path.suffix == ".obj":
        comments, triangles = read_obj(path)
        assert any("SPACE=LPS" in line for line in comments)
    else:
        header, triangles = read_stl(path)
        assert b"SPACE=LPS" in header
    vertices = triangles.reshape(-1, 3)
    ijk = (vertices - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    half = np.abs(ijk - np.round(ijk)) > 0.25  # the one coordinate at .5
    assert np.all(half.sum(axis=1) == 1), "a vertex not on a voxel edge midpoint"
    assert np.allclose(np.abs(ijk - np.round(ijk))[half], 0.5, atol=2e-3)
    assert np.allclose(ijk[~half], np.round(ijk[~half]), atol=2e-3)
    low = np.where(half, np.floor(ijk), np.round(ijk)).astype(int)
    high = low + half.astype(int)

    def inside(index: np.ndarray) -> np.ndarray:
        ok = np.all((index >= 0) & (index < np.asarray(data.shape)), axis=1)
        values = np.zeros(len(index), dtype=bool)
        values[ok] = data[tuple(index[ok].T)] == label
        return values

    assert np.all(inside(low) != inside(high)), "a vertex that does not separate the object from outside"
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0
    voxel_volume = abs(np.linalg.det(affine[:3, :3])) * int((data == label).sum())
    assert 0.8 * voxel_volume < volume < 1.05 * voxel_volume


def _run(volume: Path, out: Path, mesh_format: str = "stl") -> dict:
    clicks = out / "clicks.json"
    out.mkdir(parents=True, exist_ok=True)
    clicks.write_text(json.dumps({"space": "lps", "objects": [
        {"name": name, "label": label, "points": [point], "point_labels": [1]}
        for name, (label, point) in CLICKS_LPS.items()]}))
    return infer_file(volume, clicks, out / "mask.dcm", loaded=_fake(), mesh=out / "meshes", max_crops=1,
                      mesh_format=mesh_format)


def _assert_same_places(out: Path, source_uid: str | None, mesh_format: str = "stl") -> dict[int, set]:
    from_nifti, data, affine = nifti_points(out / "mask.nii.gz")
    from_seg, seg = seg_points(out / "mask.dcm")
    assert set(from_nifti) == {5, 2}
    assert_same_points(from_seg, from_nifti)  # same voxels, same physical points
    for name, (label, click) in CLICKS_LPS.items():
        voxel = np.round(np.linalg.solve(affine[:3, :3], np.asarray(click) - affine[:3, 3])).astype(int)
        assert data[tuple(voxel)] == label, f"the ball of {name} is not around its click"
        check_mesh(out / "meshes" / f"mask_{label}_{name}.{mesh_format}", data, affine, label)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "lesion"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "fastsam3d" and "sphere" in algorithm.AlgorithmParameters
    if source_uid is not None:
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid
    return from_nifti


# ----------------------------------------------------------------------------------------- tests
def test_real_series_seg_labelmap_and_meshes_agree(series_dir, tmp_path):
    result = _run(series_dir, tmp_path / "out")
    assert result["outputs"]["dicom_seg"] == str(tmp_path / "out" / "mask.dcm")
    assert result["input"]["dicom"]["files"] == 20
    assert any("derived from the series' contents" in w for w in result["warnings"])  # anonymised: no UIDs
    _assert_same_places(tmp_path / "out", None)
    sidecar = json.loads((tmp_path / "out" / "mask.json").read_text())
    assert sidecar["outputs"]["dicom_seg_segments"] == [{"segment_number": 1, "label": 5, "name": "liver"},
                                                        {"segment_number": 2, "label": 2, "name": "lesion"}]


@pytest.mark.parametrize("variant", ["flipped", "oblique"])
def test_variant_series_seg_labelmap_and_meshes_agree(slices, tmp_path, variant):
    uid = pydicom.uid.generate_uid()
    options = ({"flip_rows": True} if variant == "flipped" else
               {"rotate": rotation((0.3, 1.0, 0.2), 20.0), "centre": CLICKS_LPS["liver"][1]})
    write_variant(slices, tmp_path / variant, crop=CROP, series_uid=uid, **options)
    image = read_dicom(tmp_path / variant).image
    if variant == "flipped":
        assert np.allclose(np.asarray(image.GetDirection()).reshape(3, 3), np.diag([1.0, -1.0, -1.0]))
    mesh_format = "obj" if variant == "oblique" else "stl"  # the OBJ writer proven on the oblique series
    result = _run(tmp_path / variant, tmp_path / "out", mesh_format)
    assert not any("derived" in w for w in result["warnings"])
    _assert_same_places(tmp_path / "out", uid, mesh_format)


def test_validation_labelmap_as_dicom_seg_lands_on_the_same_points(series_dir, data_dir, tmp_path):
    """The validation labelmap (stored y-flipped) resampled onto the series by physical position, written as
    a DICOM-SEG: each segment's points are exactly the labelmap's points of that value."""
    series = read_dicom(series_dir)
    stored = sitk.ReadImage(str(data_dir / "validation" / "abdomen_ct_dicom_seg.nii.gz"))
    labels = array_ijk(resample_like(stored, series.image, "nearest"))
    keep = {5: "liver", 1: "spleen", 52: "aorta", 32: "vertebrae_T12"}
    labels = np.where(np.isin(labels, list(keep)), labels, 0).astype(np.uint8)
    segments = [SegmentSpec(v, n, "#ff0000") for v, n in keep.items()]
    write_dicom_seg(tmp_path / "v.dcm", labels, series, segments, AlgorithmSpec("fastsam3d", "0", "m", "w", "0" * 64))
    from_seg, _ = seg_points(tmp_path / "v.dcm")
    stored_ijk = array_ijk(stored)
    stored_affine = np.eye(4)
    stored_affine[:3, :3] = np.asarray(stored.GetDirection()).reshape(3, 3) * np.asarray(stored.GetSpacing())
    stored_affine[:3, 3] = stored.GetOrigin()
    for value in keep:  # the points of the ORIGINAL stored file, through its own (flipped) geometry
        expected = _rounded(_points(np.argwhere(stored_ijk == value).astype(float), stored_affine))
        assert_same_points({value: from_seg[value]}, {value: expected})


def test_empty_result_still_writes_a_valid_seg(series_dir, tmp_path, caplog):
    series = read_dicom(series_dir)
    labels = np.zeros(series.image.GetSize(), dtype=np.uint8)
    write_dicom_seg(tmp_path / "e.dcm", labels, series, [SegmentSpec(3, "nothing", "#00ff00")],
                    AlgorithmSpec("fastsam3d", "0", "m", "w", "0" * 64))
    seg = hd.seg.segread(str(tmp_path / "e.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["nothing"]
    assert not seg.pixel_array.any()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # nothing highdicom would print
