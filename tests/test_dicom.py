"""DICOM series input (imaging/dicom.py): the real validation series read with its exact geometry, variants
(flipped, oblique, zipped) that must give the same physical image, the validation labelmap placed by physical
coordinates, and every refused input — one line, exit 3 (2 for usage), nothing written."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from dicom_builders import rotation, source_slices, write_structured_report, write_variant
from fastsam3d_cli.cli import app
from fastsam3d_cli.errors import BadInputError, ExitCode
from fastsam3d_cli.imaging.dicom import read_dicom
from fastsam3d_cli.imaging.volumes import affine_lps, array_ijk, read_image, resample_like
from infer_phantoms import CLI_ENV, phantom, write

runner = CliRunner()
CROP = (180, 308, 150, 310)  # rows 180..307, columns 150..309: 160×128 pixels, keeps the variants fast


@pytest.fixture(scope="module")
def series_dir(data_dir) -> Path:
    path = data_dir / "validation" / "abdomen_ct_dicom"
    if not path.is_dir():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="module")
def slices(series_dir):
    return source_slices(series_dir)


@pytest.fixture(scope="module")
def real(series_dir):
    return read_dicom(series_dir)


@pytest.fixture(scope="module")
def cropped(slices, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cropped") / "ct"
    write_variant(slices, folder, crop=CROP)
    return folder


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


# ----------------------------------------------------------------------------------------- the real series
def test_real_series_geometry_and_pixels_match_the_headers(real, slices):
    image = real.image
    assert image.GetSize() == (512, 512, 20)
    assert np.allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    assert np.allclose(image.GetDirection(), np.eye(3).ravel())
    assert np.allclose(image.GetOrigin(), [float(v) for v in slices[0].ImagePositionPatient])  # lowest z first
    assert real.modality == "CT" and real.description == "CT Body 3.0" and len(real.files) == 20
    voxels = array_ijk(image)
    for k in (0, 7, 19):  # slice k is the k-th along the normal; row j, column i
        assert np.array_equal(voxels[:, :, k], _hu(slices[k]).T)
    # every voxel's LPS point: IPP + i·Δc·row + j·Δr·column, the DICOM definition
    ds = slices[7]
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    point = ipp + 300 * 0.9765625 * np.array([1.0, 0, 0]) + 100 * 0.9765625 * np.array([0, 1.0, 0])
    assert np.allclose(affine_lps(image) @ [300, 100, 7, 1], [*point, 1])


def test_read_image_and_the_predictor_path_read_a_folder(series_dir, real):
    image = read_image(series_dir)
    assert np.array_equal(array_ijk(image), array_ijk(real.image))
    assert np.allclose(affine_lps(image), affine_lps(real.image))


def test_validation_labelmap_lands_on_the_series_by_physical_coordinates(data_dir, real):
    labels_path = data_dir / "validation" / "abdomen_ct_dicom_seg.nii.gz"
    stored = sitk.ReadImage(str(labels_path))
    assert np.allclose(stored.GetDirection(), (1, 0, 0, 0, -1, 0, 0, 0, 1))  # stored with y flipped
    placed = array_ijk(resample_like(stored, real.image, "nearest"))
    assert np.array_equal(placed, array_ijk(stored)[:, ::-1, :])  # an exact flip of the index, nothing else
    names = {int(k): v for k, v in json.loads((data_dir / "validation" /
                                               "abdomen_ct_dicom_seg_labels.json").read_text()).items()}
    hu = array_ijk(real.image).astype(np.float64)
    by_name = {name: value for value, name in names.items()}
    vertebrae = np.isin(placed, [by_name["vertebrae_T11"], by_name["vertebrae_T12"]])
    liver = placed == by_name["liver"]
    assert hu[vertebrae].mean() > 200  # bone
    assert 30 < hu[liver].mean() < 200  # contrast-enhanced soft tissue
    # the same check fails for the labelmap laid on by array index (what a flipped-mask bug does)
    wrong = array_ijk(stored)
    assert hu[np.isin(wrong, [by_name["vertebrae_T11"], by_name["vertebrae_T12"]])].mean() < 150


# ----------------------------------------------------------------------------------------- variants
def test_flipped_series_is_the_same_physical_image(slices, cropped, tmp_path):
    reference = read_dicom(cropped).image
    flipped_dir = tmp_path / "flipped"
    write_variant(slices, flipped_dir, crop=CROP, flip_rows=True, order=list(range(19, -1, -1)))
    flipped = read_dicom(flipped_dir).image
    direction = np.asarray(flipped.GetDirection()).reshape(3, 3)
    assert np.allclose(direction, np.diag([1.0, -1.0, -1.0]))  # rows bottom-up → j and the normal k reversed
    assert not np.array_equal(array_ijk(flipped), array_ijk(reference))
    # every voxel centre of one grid is a voxel centre of the other, holding the same value
    assert np.array_equal(array_ijk(resample_like(flipped, reference, "nearest")), array_ijk(reference))
    assert np.array_equal(array_ijk(flipped), array_ijk(reference)[:, ::-1, ::-1])


def test_oblique_series_keeps_its_rotation(slices, cropped, tmp_path):
    reference = read_dicom(cropped).image
    turn = rotation((1.0, 0.4, 0.2), 25.0)
    centre = np.array([-100.0, -250.0, -785.0])
    write_variant(slices, tmp_path / "oblique", crop=CROP, rotate=turn, centre=centre)
    oblique = read_dicom(tmp_path / "oblique").image
    assert np.allclose(np.asarray(oblique.GetDirection()).reshape(3, 3), turn, atol=1e-8)
    assert np.array_equal(array_ijk(oblique), array_ijk(reference))  # same pixels, stored the same way
    ijk = np.array([[0, 0, 0, 1], [159, 127, 19, 1], [40, 90, 11, 1]], dtype=float).T
    expected = turn @ ((affine_lps(reference) @ ijk)[:3] - centre[:, None]) + centre[:, None]
    assert np.allclose((affine_lps(oblique) @ ijk)[:3], expected, atol=1e-5)


def test_zip_reads_like_the_folder(cropped, tmp_path):
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(cropped.iterdir()):
            zf.write(path, f"study/ct/{path.name}")
    from_zip, from_folder = read_dicom(archive), read_dicom(cropped)
    assert np.array_equal(array_ijk(from_zip.image), array_ijk(from_folder.image))
    assert np.allclose(affine_lps(from_zip.image), affine_lps(from_folder.image))
    assert from_zip.files[0] == Path("study/ct/slice_000.dcm")
    assert not list(tmp_path.glob("fastsam3d-dicom-*"))


def test_series_picks_one_of_several(slices, tmp_path):
    write_variant(slices, tmp_path / "mix", crop=CROP, series_uid="1.2.3.4", description="first")
    write_variant(slices, tmp_path / "mix" / "b", crop=CROP, series_uid="1.2.3.5", description="second",
                  flip_rows=True)
    chosen = read_dicom(tmp_path / "mix", series="1.2.3.5")
    assert chosen.uid == "1.2.3.5" and chosen.description == "second"
    assert np.allclose(np.asarray(chosen.image.GetDirection()).reshape(3, 3), np.diag([1.0, -1.0, -1.0]))


# ----------------------------------------------------------------------------------------- refused series
def _expect_bad(folder: Path, *fragments: str, series: str | None = None) -> None:
    with pytest.raises(BadInputError) as caught:
        read_dicom(folder, series)
    assert caught.value.exit_code == ExitCode.BAD_INPUT
    line = caught.value.one_line()
    assert "\n" not in line
    for fragment in fragments:
        assert fragment in line, line


def test_uneven_spacing_is_refused(slices, tmp_path):
    paths = write_variant(slices, tmp_path / "s", crop=CROP)
    ds = pydicom.dcmread(str(paths[10]))
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.7
    ds.save_as(str(paths[10]))
    _expect_bad(tmp_path / "s", "uneven slice spacing", "slice_010.dcm")


def test_missing_slice_is_refused(slices, tmp_path):
    write_variant(slices, tmp_path / "s", crop=CROP, order=[i for i in range(20) if i != 6])
    _expect_bad(tmp_path / "s", "1 slice(s) missing", "slice_005.dcm", "slice_006.dcm")


def test_mixed_orientations_are_refused(slices, tmp_path):
    paths = write_variant(slices, tmp_path / "s", crop=CROP)
    ds = pydicom.dcmread(str(paths[3]))
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(str(paths[3]))
    _expect_bad(tmp_path / "s", "mixes slice orientations", "slice_003.dcm")


def test_localiser_in_the_series_is_refused(slices, tmp_path):
    paths = write_variant(slices, tmp_path / "s", crop=CROP)
    ds = pydicom.dcmread(str(paths[0]))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(str(paths[0]))
    _expect_bad(tmp_path / "s", "localiser", "slice_000.dcm")


def test_duplicate_positions_are_refused(slices, tmp_path):
    write_variant(slices, tmp_path / "s", crop=CROP, order=[0, 1, 2, 2, 3])
    _expect_bad(tmp_path / "s", "same position")


# ----------------------------------------------------------------------------------------- CLI bad input
@pytest.fixture()
def clicks(tmp_path) -> Path:
    path = tmp_path / "clicks.json"
    path.write_text(json.dumps({"space": "ijk", "objects": [{"name": "a", "label": 1, "points": [[5, 5, 5]],
                                                             "point_labels": [1]}]}))
    return path


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _run_refused(folder: Path, code: int, fragments: tuple[str, ...], *args: str) -> None:
    before = _listing(folder)
    result = runner.invoke(app, ["infer", *args, "--checkpoint", str(folder / "none.pth")], env=CLI_ENV)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastsam3d: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    assert _listing(folder) == before  # nothing written, nothing lost


def test_cli_folder_without_dicom(tmp_path, clicks):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    _run_refused(tmp_path, 3, ("is a folder with no DICOM files", "folder (or .zip)"), str(tmp_path / "empty"), "-c", str(clicks))


def test_cli_corrupt_file(cropped, tmp_path, clicks):
    folder = tmp_path / "ct"
    shutil.copytree(cropped, folder)
    victim = folder / "slice_004.dcm"
    victim.write_bytes(victim.read_bytes()[:3000])  # header cut inside
    _run_refused(tmp_path, 3, ("slice_004.dcm", "corrupt"), str(folder), "-c", str(clicks))


def test_cli_truncated_pixels(cropped, tmp_path, clicks):
    folder = tmp_path / "ct"
    shutil.copytree(cropped, folder)
    victim = folder / "slice_004.dcm"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 20000])  # pixel data cut short
    _run_refused(tmp_path, 3, ("slice_004.dcm",), str(folder), "-c", str(clicks))


def test_cli_several_series_without_series(slices, tmp_path, clicks):
    write_variant(slices, tmp_path / "mix", crop=CROP, series_uid="1.2.3.4", description="first")
    write_variant(slices, tmp_path / "mix" / "b", crop=CROP, series_uid="1.2.3.5", description="second")
    _run_refused(tmp_path, 3, ("2 DICOM series", "1.2.3.4 'first' 160×128×20 CT", "1.2.3.5 'second'",
                               "--series UID"), str(tmp_path / "mix"), "-c", str(clicks))


def test_cli_unknown_series_uid(cropped, tmp_path, clicks):
    folder = tmp_path / "ct"
    shutil.copytree(cropped, folder)
    _run_refused(tmp_path, 3, ("--series 9.9.9 is not in", "160×128×20 CT"), str(folder), "-c", str(clicks),
                 "--series", "9.9.9")


def test_cli_structured_report_is_not_an_image(tmp_path, clicks):
    write_structured_report(tmp_path / "sr" / "report.dcm", series_uid="1.2.7")
    _run_refused(tmp_path, 3, ("1.2.7 'report'", "structured report", "not an image series"),
                 str(tmp_path / "sr"), "-c", str(clicks))


def test_cli_dicom_seg_for_a_nifti_input_is_a_usage_error(tmp_path, clicks):
    image, _ = phantom(shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0))
    write(image, tmp_path / "v.nii.gz")
    _run_refused(tmp_path, 2, ("DICOM-SEG output needs a DICOM series", "v.nii.gz"), str(tmp_path / "v.nii.gz"),
                 "-c", str(clicks), "--format", "dicom-seg")
    _run_refused(tmp_path, 2, ("DICOM-SEG output needs a DICOM series",), str(tmp_path / "v.nii.gz"),
                 "-c", str(clicks), "-o", str(tmp_path / "mask.dcm"))
    _run_refused(tmp_path, 2, ("--series 1.2 is for DICOM input",), str(tmp_path / "v.nii.gz"),
                 "-c", str(clicks), "--series", "1.2")
    _run_refused(tmp_path, 2, ("--format nifti is unknown",), str(tmp_path / "v.nii.gz"),
                 "-c", str(clicks), "--format", "nifti")


def test_cli_dicom_seg_and_mesh_locations_are_checked_first(cropped, tmp_path, clicks):
    folder = tmp_path / "ct"
    shutil.copytree(cropped, folder)
    (tmp_path / "mask.dcm").write_bytes(b"an earlier result")
    _run_refused(tmp_path, 3, ("mask.dcm already exists", "--overwrite"), str(folder), "-c", str(clicks),
                 "-o", str(tmp_path / "mask.dcm"))
    _run_refused(tmp_path, 3, ("--mesh", "is a file, not a folder"), str(folder), "-c", str(clicks),
                 "--mesh", str(tmp_path / "mask.dcm"))
    _run_refused(tmp_path, 2, ("-o", "is a DICOM file but --format is labelmap"), str(folder), "-c", str(clicks),
                 "-o", str(tmp_path / "new.dcm"), "--format", "labelmap")
    _run_refused(tmp_path, 2, ("--mesh-format ply is unknown", "stl, obj"), str(folder), "-c", str(clicks),
                 "--mesh", str(tmp_path / "m"), "--mesh-format", "ply")


def test_default_outputs_of_a_folder_given_as_dot_go_beside_it(cropped, tmp_path, monkeypatch):
    from fastsam3d_cli.interactive.export import labelmap_and_format

    folder = tmp_path / "ct"
    shutil.copytree(cropped, folder)
    monkeypatch.chdir(folder)
    assert labelmap_and_format(Path("."), None, None) == (tmp_path / "ct_mask.nii.gz", False)
    assert labelmap_and_format(Path("."), None, "dicom-seg") == (tmp_path / "ct_mask.nii.gz", True)
    assert labelmap_and_format(Path("."), Path("x.dcm"), None) == (Path("x.nii.gz"), True)


def test_slices_with_their_own_rescale_are_read_as_float(slices, cropped, tmp_path):
    """A slice whose RescaleSlope differs (0.5, odd stored values): its values keep their .5, never cast to the
    other slices' integer type."""
    reference = array_ijk(read_dicom(cropped).image).astype(np.float64)
    paths = write_variant(slices, tmp_path / "s", crop=CROP)
    ds = pydicom.dcmread(str(paths[5]))
    ds.PixelData = (ds.pixel_array.astype(np.uint16) * 2 + 1).tobytes()
    ds.BitsStored, ds.HighBit, ds.RescaleSlope = 16, 15, "0.5"
    ds.save_as(str(paths[5]))
    image = read_dicom(tmp_path / "s").image
    assert image.GetPixelID() == sitk.sitkFloat32
    expected = reference.copy()
    expected[:, :, 5] += 0.5
    assert np.array_equal(array_ijk(image).astype(np.float64), expected)


def test_gantry_tilt_is_refused(slices, tmp_path):
    """Axial slices whose positions drift in y from slice to slice (a tilted gantry): not one 3D grid."""
    paths = write_variant(slices, tmp_path / "s", crop=CROP)
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(str(path))
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.4 * index
        ds.save_as(str(path))
    _expect_bad(tmp_path / "s", "not stacked along their normal", "gantry tilt")


def test_cli_dicom_seg_and_meshes_end_to_end_with_a_real_model(slices, tmp_path):
    """The tiny model on a (cropped) series through the command line: --series, --format and --mesh reach
    infer_file, the table names every file written, and the SEG references the chosen series."""
    import highdicom as hd

    from infer_phantoms import make_tiny_checkpoint

    write_variant(slices, tmp_path / "study" / "a", crop=CROP, series_uid="1.2.3.4")
    write_variant(slices, tmp_path / "study" / "b", crop=CROP, series_uid="1.2.3.5", flip_rows=True)
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pth")
    clicks = tmp_path / "c.json"
    clicks.write_text(json.dumps({"space": "ijk", "objects": [
        {"name": "organ", "label": 4, "points": [[80, 64, 10]], "point_labels": [1]}]}))
    result = runner.invoke(app, ["infer", str(tmp_path / "study"), "-c", str(clicks), "--checkpoint", str(checkpoint),
                                 "--series", "1.2.3.5", "--format", "dicom-seg", "--mesh", str(tmp_path / "m"),
                                 "--max-crops", "1", "--device", "cpu"], env=CLI_ENV)
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((tmp_path / "study_mask.json").read_text())
    assert sidecar["input"]["dicom"]["series_uid"] == "1.2.3.5" and sidecar["input"]["size"] == [160, 128, 20]
    written = [tmp_path / "study_mask.nii.gz", tmp_path / "study_mask.json", tmp_path / "study_mask.dcm"]
    written += [Path(p) for p in (sidecar["outputs"]["meshes"] or {}).values()]
    wrote = " ".join(result.stdout.split())
    for path in written:
        assert path.is_file() and str(path) in wrote
    seg = hd.seg.segread(str(tmp_path / "study_mask.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.3.5"
    assert str(seg.SegmentSequence[0].SegmentDescription) == "fastsam3d label 4"


def test_benchmark_volume_reads_a_dicom_series_chosen_by_uid(slices, tmp_path):
    """`benchmark --volume DIR --series UID` times infer on that series; without --series the folder's two
    series are listed (exit 3) and nothing is timed; --series without --volume is a usage error."""
    write_variant(slices, tmp_path / "study" / "a", crop=CROP, series_uid="1.2.3.4", description="first")
    write_variant(slices, tmp_path / "study" / "b", crop=CROP, series_uid="1.2.3.5", description="second")
    clicks = tmp_path / "c.json"
    clicks.write_text(json.dumps({"space": "ijk", "objects": [
        {"name": "organ", "label": 1, "points": [[80, 64, 10]], "point_labels": [1]}]}))
    quick = ["benchmark", "-m", "fastsam3d-tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--clicks", "1",
             "--no-flops", "--volume", str(tmp_path / "study"), "--clicks-file", str(clicks)]
    refused = runner.invoke(app, quick, env=CLI_ENV)
    assert refused.exit_code == 3 and "2 DICOM series" in refused.stderr and "--series UID" in refused.stderr
    result = runner.invoke(app, [*quick, "--series", "1.2.3.5", "--json"], env=CLI_ENV)
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["settings"]["series"] == "1.2.3.5"
    assert payload["configs"][0]["end_to_end"]["total"]["median_ms"] > 0
    usage = runner.invoke(app, ["benchmark", "-m", "fastsam3d-tiny", "--series", "1.2.3.5"], env=CLI_ENV)
    assert usage.exit_code == 2 and "--series without --volume" in usage.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "study"]


def test_serve_opens_a_dicom_series_by_folder_and_by_zip_upload(slices, tmp_path):
    """`serve` reads a DICOM folder under --root (--series picks one of two) and a .zip upload; the page gets
    the series as a NIfTI with the same grid; a click lands where infer puts it on the same series."""
    import httpx
    import nibabel as nib

    from fastsam3d_cli.serve.app import ServeConfig
    from fastsam3d_cli.serve.server import BackgroundServer
    from fastsam3d_cli.weights.loading import load_inference_model
    from infer_phantoms import make_tiny_checkpoint

    root = tmp_path / "root"
    write_variant(slices, root / "study" / "a", crop=CROP, series_uid="1.2.3.4", description="first")
    write_variant(slices, root / "study" / "b", crop=CROP, series_uid="1.2.3.5", description="second",
                  flip_rows=True)
    archive = tmp_path / "b.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((root / "study" / "b").iterdir()):
            zipped.write(path, path.name)
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pth")
    loaded = load_inference_model(checkpoint=checkpoint, device="cpu")
    with BackgroundServer(ServeConfig(loaded, root=root, max_crops=1)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        assert {"study/a/", "study/b/"} <= set(client.get("/api/files").json()["files"])
        several = client.post("/api/sessions", json={"path": "study"})
        assert several.status_code == 400 and "2 DICOM series" in several.json()["error"]
        opened = client.post("/api/sessions", json={"path": "study", "series": "1.2.3.5"})
        assert opened.status_code == 201, opened.text
        session = opened.json()
        assert session["size"] == [160, 128, 20] and session["viewer_file"] == "volume.nii"
        viewer = tmp_path / "viewer.nii"
        viewer.write_bytes(client.get(f"/api/sessions/{session['id']}/volume/volume.nii").content)
        series = read_dicom(root / "study", "1.2.3.5").image
        assert nib.load(str(viewer)).shape == (160, 128, 20)
        np.testing.assert_allclose(affine_lps(read_image(viewer)), affine_lps(series), atol=1e-4)
        client.post(f"/api/sessions/{session['id']}/objects", json={"name": "organ"})
        answer = client.post(f"/api/sessions/{session['id']}/objects/organ/clicks", json={"point": [80, 64, 10]})
        assert answer.status_code == 200, answer.text
        uploaded = client.post("/api/sessions", params={"filename": "b.zip"}, content=archive.read_bytes(),
                               headers={"Content-Type": "application/octet-stream"})
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["size"] == [160, 128, 20]
        wrong = client.post("/api/sessions", json={"path": "study/a", "series": "9.9.9"})
        assert wrong.status_code == 400 and "--series 9.9.9 is not in" in wrong.json()["error"]
    clicks = tmp_path / "c.json"
    clicks.write_text(json.dumps({"space": "ijk", "objects": [
        {"name": "organ", "label": 1, "points": [[80, 64, 10]], "point_labels": [1]}]}))
    result = runner.invoke(app, ["infer", str(root / "study"), "--series", "1.2.3.5", "-c", str(clicks),
                                 "-o", str(tmp_path / "infer.nii.gz"), "--checkpoint", str(checkpoint),
                                 "--max-crops", "1", "--device", "cpu"], env=CLI_ENV)
    assert result.exit_code == 0, result.stderr
    assert int((np.asarray(nib.load(str(tmp_path / "infer.nii.gz")).dataobj) == 1).sum()) == answer.json()["voxels"]
