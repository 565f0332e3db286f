"""Issue 15.2: a cut NIfTI (`.nii` cut short, `.nii.gz` cut in half) is exit 3 "… is truncated or corrupt"
wherever a volume is read (infer, prepare, train, validate), never a zero-filled volume; train/validate also
compare prepared files with the sizes and label voxel counts the manifest records."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.imaging.volumes import read_image
from infer_phantoms import CLI_ENV as INFER_ENV, make_tiny_checkpoint, one_line_error, phantom, write
from prepare_phantoms import SHAPE, all_files, make_v2_dataset
from train_phantoms import CLI_ENV, make_prepared, tree

runner = CliRunner()


def _cut(path: Path, keep: float = 0.5) -> None:
    """Keep the first `keep` of the file (header intact), as an interrupted copy or download would."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pth")


@pytest.fixture()
def volume(tmp_path) -> Path:
    image, _ = phantom()
    return write(image, tmp_path / "v.nii.gz")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_cut_nifti_is_refused_by_the_reader(volume, tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(volume)), str(path), useCompression=suffix == ".nii.gz")
    assert read_image(path).GetSize() == (48, 40, 32)  # whole: fine
    _cut(path)
    needed = 352 + 48 * 40 * 32 * sitk.ReadImage(str(volume)).GetSizeOfPixelComponent()
    with pytest.raises(BadInputError, match=rf"volume .*cut{suffix.replace('.', '[.]')} is truncated or corrupt: "
                                            rf"its header needs {needed} bytes"):
        read_image(path, what="volume")


def test_whole_files_in_unusual_but_valid_gzip_layouts_are_read(volume, tmp_path):
    raw = gzip.decompress(volume.read_bytes())
    members = tmp_path / "members.nii.gz"  # several gzip members (bgzip, concatenated streams)
    members.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    padded = tmp_path / "padded.nii.gz"  # zero bytes after the stream (some tape/transfer tools)
    padded.write_bytes(volume.read_bytes() + b"\0" * 64)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(volume)))
    for path in (members, padded):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), expected)


def test_infer_refuses_a_cut_volume_and_writes_nothing(volume, tmp_path, tiny):
    (tmp_path / "clicks.json").write_text(json.dumps({"space": "ijk", "objects": [
        {"name": "organ", "label": 1, "points": [[24, 20, 16]], "point_labels": [1]}]}))
    _cut(volume)
    before = tree(tmp_path)
    result = runner.invoke(app, ["infer", str(volume), "--clicks", str(tmp_path / "clicks.json"),
                                 "--checkpoint", str(tiny)], env=INFER_ENV)
    one_line_error(result, 3, f"volume {volume} is truncated or corrupt", "download it again")
    assert tree(tmp_path) == before


def test_prepare_refuses_a_cut_label_and_writes_nothing(tmp_path):
    noisy = (np.random.default_rng(0).random(SHAPE) < 0.5).astype(np.uint8)  # big enough to cut after the header
    raw = make_v2_dataset(tmp_path / "raw", label_arrays={"case_a": noisy})
    _cut(raw / "labelsTr" / "case_a.nii.gz")
    out = tmp_path / "prepared"
    result = runner.invoke(app, ["prepare", str(raw), "-o", str(out)], env=CLI_ENV)
    one_line_error(result, 3, "case_a.nii.gz is truncated or corrupt")
    assert all_files(out) == {}


@pytest.fixture()
def cut_prepared(tmp_path) -> Path:
    prepared = make_prepared(tmp_path / "prepared", cases=("p0",), classes=("ball",))
    _cut(prepared / "ball" / "CT_Dataset990_Phantom" / "labelsTr" / "p0.nii.gz")
    return prepared


def test_train_refuses_a_cut_prepared_label_before_making_a_run(cut_prepared, tmp_path):
    before = tree(tmp_path)
    result = runner.invoke(app, ["train", str(cut_prepared), "--model", "fastsam3d-tiny", "-o", str(tmp_path / "run"),
                                 "--epochs", "1", "--max-steps", "1", "--device", "cpu"], env=CLI_ENV)
    one_line_error(result, 3, "p0.nii.gz is truncated or corrupt")
    assert tree(tmp_path) == before and not (tmp_path / "run").exists()


def test_validate_refuses_a_cut_prepared_label_and_writes_nothing(cut_prepared, tmp_path, tiny):
    before = tree(tmp_path)
    result = runner.invoke(app, ["validate", str(cut_prepared), "--checkpoint", str(tiny), "--clicks", "1",
                                 "--csv", str(tmp_path / "scores.csv"), "--device", "cpu"], env=CLI_ENV)
    one_line_error(result, 3, "p0.nii.gz is truncated or corrupt")
    assert tree(tmp_path) == before


@pytest.fixture()
def manifest_prepared(tmp_path) -> Path:
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    result = runner.invoke(app, ["prepare", str(raw), "-o", str(out), "--classes", "liver"], env=CLI_ENV)
    assert result.exit_code == 0, result.output
    return out


def _liver_label(prepared: Path) -> Path:
    return next(prepared.glob("liver/*/labelsTr/case_a.nii.gz"))


def test_a_prepared_file_of_another_size_than_the_manifest_records_is_refused(manifest_prepared, tmp_path):
    label = _liver_label(manifest_prepared)
    size = label.stat().st_size
    image = sitk.ReadImage(str(label))
    array = sitk.GetArrayFromImage(image)
    array[0] = 1  # replaced by another valid label file
    replaced = sitk.GetImageFromArray(array)
    replaced.CopyInformation(image)
    sitk.WriteImage(replaced, str(label), useCompression=True)
    assert label.stat().st_size != size
    before = tree(tmp_path)
    result = runner.invoke(app, ["train", str(manifest_prepared), "--model", "fastsam3d-tiny", "-o",
                                 str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu"], env=CLI_ENV)
    one_line_error(result, 3, f"prepared file {label} has", "the manifest records",
                    "re-run the same fastsam3d prepare command")
    assert tree(tmp_path) == before


def test_a_prepared_label_whose_voxels_differ_from_the_manifest_is_refused(manifest_prepared):
    from fastsam3d_cli.data.prepared import list_prepared_samples
    from fastsam3d_cli.data.training_data import load_sample

    sample = list_prepared_samples(manifest_prepared)[0]
    assert load_sample(sample).label.sum() == sample.voxels
    # A valid file of the same size on disk is not caught by the size check; the voxel count still differs.
    changed = type(sample)(**{**sample.__dict__, "voxels": sample.voxels + 1})
    with pytest.raises(BadInputError, match=rf"has {sample.voxels} label voxels, the manifest records "
                                            rf"{sample.voxels + 1}: it changed since prepare wrote it"):
        load_sample(changed)
