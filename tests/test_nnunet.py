"""`fastsam3d_cli.data.nnunet`: dataset.json validation, v1/v2 detection, label maps, case discovery."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.data.nnunet import detect_format, load_raw_dataset, parse_labels, sanitize_name
from prepare_phantoms import make_v1_task, make_v2_dataset, phantom_label, write_volume


def _meta(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _rewrite(root: Path, **changes) -> None:
    meta = _meta(root)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (root / "dataset.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------- detection
def test_detects_v2_from_keys_not_folder_name(tmp_path):
    root = make_v2_dataset(tmp_path, name="Task042_NamedLikeV1")
    dataset = load_raw_dataset(root)
    assert dataset.format == "v2"
    assert dataset.modality == "CT"
    assert [c.case_id for c in dataset.cases] == ["case_a"]


def test_detects_v1_from_keys_not_folder_name(tmp_path):
    root = make_v1_task(tmp_path, name="Dataset042_NamedLikeV2")
    assert load_raw_dataset(root).format == "v1"


@pytest.mark.parametrize("meta,expected", [
    ({"labels": {"background": 0, "a": 1}, "modality": {"0": "CT"}}, "v2"),  # label map decides
    ({"labels": {"0": "background", "1": "a"}, "channel_names": {"0": "CT"}}, "v1"),
    ({"labels": {"background": 0, "a": [1, 2]}}, "v2"),
    ({"channel_names": {"0": "CT"}}, "v2"),
    ({"training": []}, "v1"),
])
def test_detect_format_rules(meta, expected):
    assert detect_format(meta, Path("dataset.json")) == expected


def test_neither_format_names_the_missing_keys():
    with pytest.raises(BadInputError, match="channel_names, labels, numTraining, file_ending"):
        detect_format({"name": "x"}, Path("dataset.json"))


# ------------------------------------------------------------------------------------ bad jsons
def test_missing_dataset_json(tmp_path):
    (tmp_path / "Dataset001_X").mkdir()
    with pytest.raises(BadInputError, match="has no dataset.json"):
        load_raw_dataset(tmp_path / "Dataset001_X")


def test_invalid_json_says_where(tmp_path):
    root = make_v2_dataset(tmp_path)
    (root / "dataset.json").write_text('{"labels": {"background": 0,}')
    with pytest.raises(BadInputError, match=r"is not valid JSON at line 1 column \d+"):
        load_raw_dataset(root)


@pytest.mark.parametrize("missing", ["file_ending", "numTraining", "channel_names"])
def test_v2_missing_required_key_is_named(tmp_path, missing):
    root = make_v2_dataset(tmp_path)
    _rewrite(root, **{missing: None})
    with pytest.raises(BadInputError, match=f"missing required key\\(s\\): {missing}"):
        load_raw_dataset(root)


def test_v1_json_without_training_names_it(tmp_path):
    root = make_v1_task(tmp_path)
    _rewrite(root, training=None)
    with pytest.raises(BadInputError, match=r"\(nnU-Net v1\) is missing required key\(s\): training"):
        load_raw_dataset(root)


def test_bad_label_value_type(tmp_path):
    root = make_v2_dataset(tmp_path, labels={"background": 0, "liver": "one"})
    with pytest.raises(BadInputError, match="label 'liver' must be a non-negative integer"):
        load_raw_dataset(root)


# --------------------------------------------------------------------------------------- labels
def test_v2_regions_ignore_and_background():
    meta = {"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": 3, "ignore": 4}}
    labels = parse_labels(meta, "v2", Path("dataset.json"))
    assert [(c.name, c.source_name, c.values) for c in labels.classes] == [
        ("whole_tumor", "whole tumor", (1, 2, 3)), ("tumor_core", "tumor_core", (2, 3)), ("enhancing", "enhancing", (3,))]
    assert labels.ignore_value == 4
    assert labels.allowed_values == frozenset({0, 1, 2, 3, 4})


def test_v1_labels_keep_spelling_spaces_become_underscores():
    labels = parse_labels({"labels": {"0": "background", "1": "Left Kidney", "2": "PZ"}}, "v1", Path("d.json"))
    assert [c.name for c in labels.classes] == ["Left_Kidney", "PZ"]
    assert labels.ignore_value is None


def test_names_colliding_after_sanitising_are_rejected():
    with pytest.raises(BadInputError, match="both become class 'left_kidney'"):
        parse_labels({"labels": {"background": 0, "left kidney": 1, "left_kidney": 2}}, "v2", Path("d.json"))


def test_label_name_with_slash_is_rejected():
    with pytest.raises(BadInputError, match="cannot be used as a folder name"):
        parse_labels({"labels": {"background": 0, "a/b": 1}}, "v2", Path("d.json"))


def test_missing_background_is_rejected():
    with pytest.raises(BadInputError, match="no background"):
        parse_labels({"labels": {"liver": 1}}, "v2", Path("d.json"))


def test_sanitize_name():
    assert sanitize_name("portal vein and splenic vein") == "portal_vein_and_splenic_vein"
    assert sanitize_name("Precentral_L") == "Precentral_L"


# -------------------------------------------------------------------------------------- cases v1
def test_v1_training_paths_without_0000_resolve_to_channel_file(tmp_path):
    root = make_v1_task(tmp_path, cases=("b", "a"))
    dataset = load_raw_dataset(root)
    assert [c.case_id for c in dataset.cases] == ["a", "b"]  # sorted
    assert dataset.cases[0].image_path == root / "imagesTr" / "a_0000.nii.gz"
    assert dataset.cases[0].label_path == root / "labelsTr" / "a.nii.gz"
    assert dataset.cases[0].channel_in_file is None


def test_v1_exact_path_wins_when_it_exists(tmp_path):
    """Raw MSD: the listed path is a real (4D) file; it is used as is, read with the user's --channel."""
    root = make_v1_task(tmp_path)
    (root / "imagesTr" / "case_a_0000.nii.gz").rename(root / "imagesTr" / "case_a.nii.gz")
    dataset = load_raw_dataset(root)
    assert dataset.cases[0].image_path == root / "imagesTr" / "case_a.nii.gz"
    assert dataset.cases[0].channel_in_file is None  # no --channel given: a 4D file will be refused
    _rewrite(root, modality={"0": "T2", "1": "ADC"})
    dataset = load_raw_dataset(root, channel=1)
    assert dataset.cases[0].channel_in_file == 1
    assert dataset.modality == "ADC"


def test_v1_missing_image_names_both_candidates(tmp_path):
    root = make_v1_task(tmp_path)
    (root / "imagesTr" / "case_a_0000.nii.gz").unlink()
    with pytest.raises(BadInputError, match=r"case case_a: image not found: neither .*case_a.nii.gz nor .*case_a_0000.nii.gz"):
        load_raw_dataset(root)


def test_missing_label_names_the_case(tmp_path):
    root = make_v1_task(tmp_path)
    (root / "labelsTr" / "case_a.nii.gz").unlink()
    with pytest.raises(BadInputError, match="Task900_Phantom case case_a: label file .* does not exist"):
        load_raw_dataset(root)


def test_empty_image_file_names_the_case(tmp_path):
    root = make_v2_dataset(tmp_path)
    (root / "imagesTr" / "case_a_0000.nii.gz").write_bytes(b"")
    with pytest.raises(BadInputError, match="case case_a: image file .* is empty"):
        load_raw_dataset(root)


# -------------------------------------------------------------------------------------- cases v2
def test_v2_folder_scan_and_multichannel_needs_channel(tmp_path):
    root = make_v2_dataset(tmp_path, cases=("p1", "p2"), channel_names={"0": "T2", "1": "ADC map"})
    with pytest.raises(BadInputError, match=r"has 2 channels \(0=T2, 1=ADC map\) — choose one with --channel N"):
        load_raw_dataset(root)
    dataset = load_raw_dataset(root, channel=1)
    assert dataset.modality == "ADC_map"
    assert [c.image_path.name for c in dataset.cases] == ["p1_0001.nii.gz", "p2_0001.nii.gz"]
    with pytest.raises(BadInputError, match=r"--channel 2 does not exist in dataset Dataset900_Phantom"):
        load_raw_dataset(root, channel=2)


def test_v2_badly_named_image_is_reported(tmp_path):
    root = make_v2_dataset(tmp_path)
    (root / "imagesTr" / "case_a_0000.nii.gz").rename(root / "imagesTr" / "case_a.nii.gz")
    with pytest.raises(BadInputError, match="does not follow nnU-Net's CASE_XXXX.nii.gz naming"):
        load_raw_dataset(root)


def test_v2_other_file_ending(tmp_path):
    root = make_v2_dataset(tmp_path, write_cases=False, extra={"file_ending": ".nrrd"})
    write_volume(root / "imagesTr" / "c1_0000.nrrd", np.ones((4, 4, 4), np.int16))
    write_volume(root / "labelsTr" / "c1.nrrd", np.zeros((4, 4, 4), np.uint8))
    (root / "imagesTr" / "notes.txt").write_text("ignored: other ending")
    dataset = load_raw_dataset(root)
    assert [(c.case_id, c.label_path.name) for c in dataset.cases] == [("c1", "c1.nrrd")]


def test_v2_dataset_mapping_replaces_scanning(tmp_path, monkeypatch):
    """Relative paths are relative to the dataset folder, absolute ones kept, $VARS expanded."""
    elsewhere = tmp_path / "elsewhere"
    write_volume(elsewhere / "img.nii.gz", np.ones((4, 4, 4), np.int16))
    write_volume(elsewhere / "seg.nii.gz", np.zeros((4, 4, 4), np.uint8))
    root = make_v2_dataset(tmp_path, write_cases=False)
    write_volume(root / "somewhere" / "x.nii.gz", np.ones((4, 4, 4), np.int16))
    write_volume(root / "somewhere" / "x_seg.nii.gz", np.zeros((4, 4, 4), np.uint8))
    monkeypatch.setenv("FASTSAM3D_TEST_DATA", str(elsewhere))
    _rewrite(root, dataset={
        "rel": {"images": ["somewhere/x.nii.gz"], "label": "./somewhere/x_seg.nii.gz"},
        "env": {"images": ["$FASTSAM3D_TEST_DATA/img.nii.gz"], "label": "${FASTSAM3D_TEST_DATA}/seg.nii.gz"},
        "abs": {"images": [str(elsewhere / "img.nii.gz")], "label": str(elsewhere / "seg.nii.gz")},
    }, numTraining=3)
    cases = {c.case_id: c for c in load_raw_dataset(root).cases}
    assert cases["rel"].image_path == root / "somewhere" / "x.nii.gz"
    assert cases["env"].image_path == elsewhere / "img.nii.gz"
    assert cases["env"].label_path == elsewhere / "seg.nii.gz"
    assert cases["abs"].label_path == elsewhere / "seg.nii.gz"


def test_v2_dataset_mapping_with_unset_variable_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTSAM3D_UNSET_VAR", raising=False)
    root = make_v2_dataset(tmp_path, write_cases=False)
    _rewrite(root, dataset={"c": {"images": ["$FASTSAM3D_UNSET_VAR/i.nii.gz"], "label": "l.nii.gz"}})
    with pytest.raises(BadInputError, match="environment variable FASTSAM3D_UNSET_VAR is not set"):
        load_raw_dataset(root)


def test_numtraining_mismatch_is_a_warning(tmp_path):
    root = make_v2_dataset(tmp_path, cases=("a", "b"))
    _rewrite(root, numTraining=5)
    dataset = load_raw_dataset(root)
    assert len(dataset.cases) == 2
    assert dataset.warnings == ("Dataset900_Phantom: dataset.json says numTraining=5 but 2 case(s) were found",)


def test_no_cases(tmp_path):
    root = make_v2_dataset(tmp_path, write_cases=False)
    (root / "imagesTr").mkdir()
    with pytest.raises(BadInputError, match="has no training cases"):
        load_raw_dataset(root)


def test_label_array_helper_is_what_the_tests_assume():
    label = phantom_label()
    assert [(v, int((label == v).sum())) for v in range(5)][1:] == [(1, 64), (2, 8), (3, 1), (4, 0)]
