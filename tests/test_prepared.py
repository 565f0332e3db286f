"""`fastsam3d_cli.data.prepared`: reading a prepared folder as PreparedSample records (for train/validate/distill)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.data.prepare import prepare_datasets
from fastsam3d_cli.data.prepared import PreparedSample, list_prepared_samples, load_manifest
from prepare_phantoms import make_v1_task, make_v2_dataset, phantom_label, read_ijk


@pytest.fixture()
def prepared(tmp_path):
    label = phantom_label()
    label[0:2, 0:2, 0:2] = 5
    labels = {"background": 0, "liver": 1, "left kidney": 2, "tiny": 3, "absent organ": 4, "ignore": 5}
    v2 = make_v2_dataset(tmp_path / "raw", cases=("a", "b"), labels=labels, label_arrays={"a": label})
    v1 = make_v1_task(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_datasets([v2, v1], out, min_volume_mm3=100)
    return out


def test_lists_written_samples_with_paths_and_metadata(prepared):
    samples = list_prepared_samples(prepared)
    assert all(isinstance(s, PreparedSample) for s in samples)
    # 3 cases × {liver, left_kidney}; tiny (27 mm³ < 100) and absent_organ are skipped, so never listed.
    assert [(s.class_name, s.dataset, s.case) for s in samples] == [
        ("left_kidney", "Dataset900_Phantom", "a"), ("left_kidney", "Dataset900_Phantom", "b"),
        ("left_kidney", "Task900_Phantom", "case_a"),
        ("liver", "Dataset900_Phantom", "a"), ("liver", "Dataset900_Phantom", "b"), ("liver", "Task900_Phantom", "case_a")]
    liver_a = samples[3]
    assert liver_a.image_path == prepared / "liver" / "CT_Dataset900_Phantom" / "imagesTr" / "a.nii.gz"
    assert liver_a.label_path == prepared / "liver" / "CT_Dataset900_Phantom" / "labelsTr" / "a.nii.gz"
    assert liver_a.modality == "CT" and liver_a.spacing_mm == 1.5
    assert liver_a.voxels == 512 and liver_a.volume_ml == pytest.approx(1.728)
    assert liver_a.ignore_path == prepared / "liver" / "CT_Dataset900_Phantom" / "ignoreTr" / "a.nii.gz"
    assert samples[4].ignore_path is None  # case b has no ignore voxels
    assert read_ijk(liver_a.label_path)[0].sum() == liver_a.voxels


def test_filters_and_unknown_names(prepared):
    assert {s.class_name for s in list_prepared_samples(prepared, classes=["left kidney"])} == {"left_kidney"}
    assert {s.dataset for s in list_prepared_samples(prepared, datasets=["Task900_Phantom"])} == {"Task900_Phantom"}
    with pytest.raises(BadInputError, match=r"unknown class name\(s\) tiny; available: left_kidney, liver"):
        list_prepared_samples(prepared, classes=["tiny"])


def test_missing_folder(tmp_path):
    with pytest.raises(BadInputError, match="prepared folder .* does not exist — run fastsam3d prepare"):
        list_prepared_samples(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    with pytest.raises(BadInputError, match=r"holds no prepared samples \(expected <class>/<modality>_<dataset>/"):
        list_prepared_samples(tmp_path)


def test_wrong_layout_folder(tmp_path):
    """A raw nnU-Net dataset handed to train by mistake: no manifest and no <class>/<subset>/imagesTr."""
    raw = make_v2_dataset(tmp_path / "raw")
    with pytest.raises(BadInputError, match="holds no prepared samples"):
        list_prepared_samples(raw)


def test_file_listed_but_missing(prepared):
    (prepared / "liver" / "CT_Dataset900_Phantom" / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(BadInputError, match="lists liver/CT_Dataset900_Phantom/labelsTr/b.nii.gz but the file is missing"):
        list_prepared_samples(prepared)


def test_corrupt_or_foreign_manifest(prepared):
    (prepared / "manifest.json").write_text("{not json")
    with pytest.raises(BadInputError, match="cannot read prepared-data manifest"):
        list_prepared_samples(prepared)
    (prepared / "manifest.json").write_text(json.dumps({"entries": []}))
    with pytest.raises(BadInputError, match="is not a fastsam3d prepared-data manifest"):
        list_prepared_samples(prepared)
    (prepared / "manifest.json").write_text(json.dumps({"format": "fastsam3d-prepared", "version": 99, "entries": []}))
    with pytest.raises(BadInputError, match="manifest version 99"):
        list_prepared_samples(prepared)


def test_folder_without_manifest_is_scanned(prepared):
    """SAM-Med3D-style folders (no manifest) are read from the layout itself."""
    (prepared / "manifest.json").unlink()
    samples = list_prepared_samples(prepared)
    assert len(samples) == 6 and samples[0].dataset == "CT_Dataset900_Phantom" and samples[0].voxels is None
    shutil.rmtree(prepared / "liver" / "MRI_Task900_Phantom" / "labelsTr")
    with pytest.raises(BadInputError, match="case_a.nii.gz has no label"):
        list_prepared_samples(prepared)


def test_shard_manifests_merge_newest_entry_wins(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    entry = next(e for e in manifest["entries"] if e["class"] == "liver" and e["case"] == "b")
    newer = dict(entry, resampled_voxels=123, prepared_at="9999-01-01T00:00:00+00:00")
    older = dict(entry, resampled_voxels=7, prepared_at="0001-01-01T00:00:00+00:00")
    for k, e in ((1, newer), (2, older)):
        (prepared / f"manifest.shard-{k}-of-2.json").write_text(json.dumps(dict(manifest, entries=[e])))
    merged = load_manifest(prepared)
    assert merged["entries"][("Dataset900_Phantom", "CT", "b", "liver")]["resampled_voxels"] == 123
    (prepared / "manifest.shard-2-of-2.json").write_text(json.dumps(dict(manifest, spacing_mm=2.0, entries=[])))
    with pytest.raises(BadInputError, match="keep one spacing per prepared folder"):
        load_manifest(prepared)


def test_binary_labels_are_strictly_0_1(prepared):
    for sample in list_prepared_samples(prepared):
        assert set(np.unique(read_ijk(sample.label_path)[0])) == {0, 1}
        if sample.ignore_path:
            assert set(np.unique(read_ijk(sample.ignore_path)[0])) == {0, 1}
