"""`prepare_datasets`: layout, geometry, binary labels, regions, ignore, skipping, resume, workers, shards."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fastsam3d_cli.data import prepare as prepare_module
from fastsam3d_cli.errors import BadInputError, UsageError
from fastsam3d_cli.data.prepare import parse_shard, prepare_datasets
from prepare_phantoms import (CLI_ENV, ORIGIN, RAS_STORED, SPACING, all_files, make_v1_task, make_v2_dataset,
                              phantom_image, phantom_label, read_ijk, write_volume)

PHANTOM = "CT_Dataset900_Phantom"


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _entries(out: Path) -> dict[tuple[str, str], dict]:
    return {(e["case"], e["class"]): e for e in _manifest(out)["entries"]}


def _world_centroid(path: Path, value: int = 1) -> np.ndarray:
    """Centroid of the voxels equal to `value`, in LPS mm (through the file's own geometry)."""
    array, image = read_ijk(path)
    ijk = np.argwhere(array == value).mean(axis=0)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk]))


# ---------------------------------------------------------------------------------- layout, content
def test_layout_binary_labels_and_manifest(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    result = prepare_datasets([raw], out, min_volume_mm3=10)

    for cls in ("liver", "left_kidney", "tiny"):  # space → _, dataset spelling otherwise
        label, image = read_ijk(out / cls / PHANTOM / "labelsTr" / "case_a.nii.gz")
        assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
        assert (out / cls / PHANTOM / "imagesTr" / "case_a.nii.gz").is_file()
    assert not (out / "background").exists() and not (out / "absent_organ").exists()
    assert not list(out.rglob(".*partial*"))  # no temporary file left

    entries = _entries(out)
    assert set(entries) == {("case_a", c) for c in ("liver", "left_kidney", "tiny", "absent_organ")}
    liver = entries[("case_a", "liver")]
    assert liver["status"] == "written" and liver["source_voxels"] == 64 and liver["source_ml"] == pytest.approx(64 * 27 / 1000)
    # 3 mm → 1.5 mm is an exact factor 2: nearest neighbour gives exactly 8 voxels per source voxel.
    assert liver["resampled_voxels"] == 64 * 8 and liver["resampled_ml"] == pytest.approx(liver["source_ml"])
    assert entries[("case_a", "absent_organ")]["reason_code"] == "absent"
    assert entries[("case_a", "left_kidney")]["source_class"] == "left kidney"
    manifest = _manifest(out)
    assert manifest["spacing_mm"] == 1.5 and manifest["version"] == 1
    source = manifest["sources"]["Dataset900_Phantom"]
    assert source["format"] == "v2" and len(source["dataset_json_sha256"]) == 64
    by_class = {c.name: c for c in result.classes}
    assert (by_class["liver"].written, by_class["absent_organ"].absent) == (1, 1)
    assert by_class["liver"].total_ml == pytest.approx(1.728)


def test_geometry_spacing_extent_orientation_and_nearest_labels(tmp_path):
    """Output at 1.5 mm, same physical extent and direction (no canonicalisation), objects in place."""
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_datasets([raw], out)
    label, label_img = read_ijk(out / "liver" / PHANTOM / "labelsTr" / "case_a.nii.gz")
    image, image_img = read_ijk(out / "liver" / PHANTOM / "imagesTr" / "case_a.nii.gz")
    assert label.shape == image.shape == (40, 32, 24)
    assert label_img.GetSpacing() == image_img.GetSpacing() == (1.5, 1.5, 1.5)
    assert np.allclose(label_img.GetDirection(), RAS_STORED)  # source orientation kept
    # Same extent: the first output voxel's cell starts where the first input voxel's cell starts.
    direction = np.asarray(RAS_STORED).reshape(3, 3)
    expected_origin = np.asarray(ORIGIN) + direction @ ((np.full(3, 1.5) - np.asarray(SPACING)) / 2)
    assert np.allclose(label_img.GetOrigin(), expected_origin) and np.allclose(image_img.GetOrigin(), expected_origin)
    # The box is where it was, physically, and exactly 2× finer (nearest, no erosion).
    assert np.allclose(_world_centroid(out / "liver" / PHANTOM / "labelsTr" / "case_a.nii.gz"),
                       _world_centroid(raw / "labelsTr" / "case_a.nii.gz"), atol=1e-6)
    assert np.argwhere(label).min(axis=0).tolist() == [4, 6, 4] and np.argwhere(label).max(axis=0).tolist() == [11, 13, 11]
    # Image resampled linearly, type kept: output voxel i sits at source index i/2 - 0.25 on the ramp 100 + 8·i.
    assert image.dtype == np.int16
    assert [int(image[i, 10, 10]) for i in (3, 4, 5, 20)] == [100 + 8 * (i / 2 - 0.25) for i in (3, 4, 5, 20)]


def test_image_written_once_and_hard_linked(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_datasets([raw], out)
    images = [out / c / PHANTOM / "imagesTr" / "case_a.nii.gz" for c in ("liver", "left_kidney", "tiny")]
    inodes = {p.stat().st_ino for p in images}
    assert len(inodes) == 1 and images[0].stat().st_nlink == 3
    assert oct(images[0].stat().st_mode & 0o777) != oct(0o600)  # readable like a normal file


def test_hard_link_fallback_copies(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(prepare_module.os, "link", refuse)
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_datasets([raw], out)
    images = [out / c / PHANTOM / "imagesTr" / "case_a.nii.gz" for c in ("liver", "left_kidney", "tiny")]
    assert len({p.stat().st_ino for p in images}) == 3
    assert len({p.read_bytes() for p in images}) == 1


def test_min_volume_is_measured_before_resampling(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    # tiny = 1 voxel of 27 mm³; left kidney = 8 voxels = 216 mm³.
    result = prepare_datasets([raw], out, min_volume_mm3=100)
    entries = _entries(out)
    assert entries[("case_a", "tiny")]["status"] == "skipped"
    assert entries[("case_a", "tiny")]["reason"] == "below --min-volume-mm3: 27.0 mm³ < 100 mm³"
    assert entries[("case_a", "left_kidney")]["status"] == "written"
    assert not (out / "tiny").exists()
    assert result.small_skips == [{"dataset": "Dataset900_Phantom", "case": "case_a", "class": "tiny",
                                   "source_mm3": 27.0, "reason": entries[("case_a", "tiny")]["reason"]}]


def test_regions_become_one_binary_class_each(tmp_path):
    label = np.zeros((12, 12, 12), np.uint8)
    label[1:5, 1:5, 1:5] = 1  # 64
    label[5:7, 1:5, 1:5] = 2  # 32
    label[7:8, 1:5, 1:5] = 3  # 16
    raw = make_v2_dataset(tmp_path / "raw", label_arrays={"case_a": label}, labels={
        "background": 0, "whole tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": 3},
        extra={"regions_class_order": [1, 2, 3]})
    out = tmp_path / "prepared"
    prepare_datasets([raw], out)
    entries = _entries(out)
    assert [entries[("case_a", c)]["source_voxels"] for c in ("whole_tumor", "tumor_core", "enhancing")] == [112, 48, 16]
    core, _ = read_ijk(out / "tumor_core" / PHANTOM / "labelsTr" / "case_a.nii.gz")
    assert core.sum() == 48 * 8 and set(np.unique(core)) == {0, 1}


def test_ignore_label_is_never_a_class_and_gets_its_own_mask(tmp_path):
    label = phantom_label()
    label[0:3, 0:2, 0:2] = 5  # 12 ignore voxels, overlapping nothing else
    labels = {"background": 0, "liver": 1, "left kidney": 2, "tiny": 3, "absent organ": 4, "ignore": 5}
    raw = make_v2_dataset(tmp_path / "raw", labels=labels, label_arrays={"case_a": label})
    out = tmp_path / "prepared"
    prepare_datasets([raw], out)
    assert not (out / "ignore").exists()
    entry = _entries(out)[("case_a", "liver")]
    assert entry["ignore_voxels_source"] == 12 and entry["ignore_voxels"] == 12 * 8
    assert entry["ignore_path"] == f"liver/{PHANTOM}/ignoreTr/case_a.nii.gz"
    ignore, _ = read_ijk(out / entry["ignore_path"])
    liver, _ = read_ijk(out / entry["label_path"])
    assert set(np.unique(ignore)) == {0, 1} and ignore.sum() == 96
    assert set(np.unique(liver)) == {0, 1} and not np.any(liver & ignore)
    assert ignore[0:6, 0:4, 0:4].all()  # the ignore region, physically in place
    manifest = _manifest(out)
    assert manifest["sources"]["Dataset900_Phantom"]["ignore_label"] == 5
    assert "ignoreTr" in manifest["ignore_encoding"]


def test_v1_task_and_v2_dataset_into_one_folder(tmp_path):
    v1 = make_v1_task(tmp_path / "raw")
    v2 = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_datasets([v2, v1], out)
    assert (out / "liver" / "MRI_Task900_Phantom" / "labelsTr" / "case_a.nii.gz").is_file()
    assert (out / "liver" / PHANTOM / "labelsTr" / "case_a.nii.gz").is_file()
    assert {s["format"] for s in _manifest(out)["sources"].values()} == {"v1", "v2"}


def test_classes_filter_and_unknown_class(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_datasets([raw], out, classes=["left kidney"])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["left_kidney"]
    with pytest.raises(BadInputError, match=r"unknown class\(es\) spleen; available: absent_organ, left_kidney, liver, tiny"):
        prepare_datasets([raw], tmp_path / "other", classes=["spleen"])
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------- bad case content
def test_grid_mismatch_stops_unless_resample_labels(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    shifted = tuple(o + 1.5 for o in ORIGIN)  # label shifted by half a voxel along x
    write_volume(raw / "labelsTr" / "case_a.nii.gz", phantom_label(), origin=shifted)
    out = tmp_path / "prepared"
    with pytest.raises(BadInputError, match=r"Dataset900_Phantom case case_a: image and label grids differ \(origin"):
        prepare_datasets([raw], out)
    assert not out.exists()
    prepare_datasets([raw], out, resample_labels=True)
    entry = _entries(out)[("case_a", "liver")]
    assert entry["source_voxels"] == 64  # measured on the label as stored
    assert np.allclose(_world_centroid(out / entry["label_path"]), _world_centroid(raw / "labelsTr" / "case_a.nii.gz"),
                       atol=0.75 + 1e-6)


def test_label_value_not_in_labels(tmp_path):
    label = phantom_label()
    label[0, 0, 0] = 9
    raw = make_v2_dataset(tmp_path / "raw", label_arrays={"case_a": label})
    out = tmp_path / "prepared"
    with pytest.raises(BadInputError, match=r"case case_a: label value\(s\) 9 not in dataset.json labels \(0..4\)"):
        prepare_datasets([raw], out)
    assert not out.exists()


@pytest.mark.parametrize("value,dtype", [(3, np.uint8), (-1, np.int16)])
def test_label_value_inside_range_or_negative(tmp_path, value, dtype):
    label = np.zeros((8, 8, 8), dtype)
    label[1:4, 1:4, 1:4] = 1
    label[5, 5, 5] = value
    raw = make_v2_dataset(tmp_path / "raw", labels={"background": 0, "a": 1, "b": 2, "ignore": 4},
                          label_arrays={"case_a": label})
    with pytest.raises(BadInputError, match=rf"case case_a: label value\(s\) {value} not in dataset.json labels \(0, 1, 2, 4\)"):
        prepare_datasets([raw], tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_float_label_file_with_whole_numbers_is_accepted(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw", label_arrays={"case_a": phantom_label().astype(np.float32)})
    prepare_datasets([raw], tmp_path / "prepared")
    assert _entries(tmp_path / "prepared")[("case_a", "liver")]["resampled_voxels"] == 512
    label = phantom_label().astype(np.float32)
    label[0, 0, 0] = 0.5
    write_volume(raw / "labelsTr" / "case_a.nii.gz", label)
    with pytest.raises(BadInputError, match="label file holds non-integer values"):
        prepare_datasets([raw], tmp_path / "other")


def test_unreadable_image(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    (raw / "imagesTr" / "case_a_0000.nii.gz").write_bytes(b"\x1f\x8b garbage, not a volume")
    out = tmp_path / "prepared"
    with pytest.raises(BadInputError, match="Dataset900_Phantom case case_a: cannot read image"):
        prepare_datasets([raw], out)
    assert not out.exists()


def test_4d_image_needs_channel(tmp_path):
    root = make_v1_task(tmp_path / "raw", modality={"0": "T2"})
    image4d = np.stack([phantom_image(), phantom_image() + 7], axis=-1)
    import nibabel as nib

    nib.save(nib.Nifti1Image(image4d, np.diag([3.0, 3.0, 3.0, 1.0])), str(root / "imagesTr" / "case_a.nii.gz"))
    write_volume(root / "labelsTr" / "case_a.nii.gz", phantom_label(), origin=(0, 0, 0))
    out = tmp_path / "prepared"
    with pytest.raises(BadInputError, match=r"case case_a: image .*case_a.nii.gz is 4D with 2 channels — choose one with --channel N"):
        prepare_datasets([root], out)
    assert not out.exists()
    prepare_datasets([root], out, channel=0)
    image, _ = read_ijk(out / "liver" / "T2_Task900_Phantom" / "imagesTr" / "case_a.nii.gz")
    assert image.shape == (40, 32, 24)


def test_second_case_bad_keeps_first_and_resumes(tmp_path):
    bad = phantom_label()
    bad[0, 0, 0] = 200
    raw = make_v2_dataset(tmp_path / "raw", cases=("a", "b"), label_arrays={"b": bad})
    out = tmp_path / "prepared"
    with pytest.raises(BadInputError, match="case b: label value"):
        prepare_datasets([raw], out)
    assert {k[0] for k in _entries(out)} == {"a"}  # the finished case is recorded, nothing of b written
    assert not list(out.rglob("b.nii.gz"))
    write_volume(raw / "labelsTr" / "b.nii.gz", phantom_label())
    result = prepare_datasets([raw], out)
    assert (result.cases_prepared, result.cases_already_complete) == (1, 1)


# --------------------------------------------------------------------------------- output folder
def test_output_inside_input_is_refused(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    before = all_files(raw)
    with pytest.raises(BadInputError, match="output folder .* is inside input dataset"):
        prepare_datasets([raw], raw / "prepared")
    assert all_files(raw) == before and not (raw / "prepared").exists()


def test_non_empty_foreign_output_is_refused(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="is not empty and has no manifest.json"):
        prepare_datasets([raw], out)
    assert all_files(out).keys() == {"notes.txt"}


def test_lost_manifest_is_rebuilt(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_datasets([raw], out)
    entries = _entries(out)
    (out / "manifest.json").unlink()
    result = prepare_datasets([raw], out)
    assert result.cases_prepared == 1
    strip = lambda e: {k: v for k, v in e.items() if k not in ("prepared_at", "image_bytes", "label_bytes")}  # noqa: E731
    assert {k: strip(e) for k, e in _entries(out).items()} == {k: strip(e) for k, e in entries.items()}


def test_other_spacing_into_same_folder_is_refused(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_datasets([raw], out)
    before = all_files(out)
    with pytest.raises(BadInputError, match="was prepared at 1.5 mm, not 2 mm"):
        prepare_datasets([raw], out, spacing_mm=2.0)
    assert all_files(out) == before


def test_option_errors_are_usage_errors(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    for kwargs in ({"spacing_mm": 0}, {"workers": 0}, {"min_volume_mm3": -1}, {"channel": -1}):
        with pytest.raises(UsageError):
            prepare_datasets([raw], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ resume, idempotence
def test_rerun_skips_complete_work_without_touching_files(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw", cases=("a", "b"))
    out = tmp_path / "prepared"
    first = prepare_datasets([raw], out)
    assert (first.cases_prepared, first.cases_already_complete) == (2, 0)
    data_files = {k: v for k, v in all_files(out).items() if k != "manifest.json"}
    second = prepare_datasets([raw], out)
    assert (second.cases_prepared, second.cases_already_complete) == (0, 2)
    assert {k: v for k, v in all_files(out).items() if k != "manifest.json"} == data_files
    assert [c.written for c in second.classes] == [c.written for c in first.classes]


def test_rerun_redoes_a_damaged_or_changed_case_only(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw", cases=("a", "b"))
    out = tmp_path / "prepared"
    prepare_datasets([raw], out)
    (out / "liver" / PHANTOM / "labelsTr" / "a.nii.gz").unlink()  # as if interrupted mid-case
    b_label = out / "liver" / PHANTOM / "labelsTr" / "b.nii.gz"
    b_mtime = b_label.stat().st_mtime_ns
    result = prepare_datasets([raw], out)
    assert (result.cases_prepared, result.cases_already_complete) == (1, 1)
    assert (out / "liver" / PHANTOM / "labelsTr" / "a.nii.gz").is_file()
    assert b_label.stat().st_mtime_ns == b_mtime
    # A changed source label is noticed (size/mtime fingerprint) and its case prepared again.
    changed = phantom_label()
    changed[2:6, 3:7, 2:7] = 1
    os.utime(raw / "labelsTr" / "b.nii.gz", ns=(1, 1))
    write_volume(raw / "labelsTr" / "b.nii.gz", changed)
    result = prepare_datasets([raw], out)
    assert result.cases_prepared == 1
    assert _entries(out)[("b", "liver")]["source_voxels"] == 80


def test_interrupted_case_leaves_no_partial_file_and_resumes(tmp_path, monkeypatch):
    raw = make_v2_dataset(tmp_path / "raw", cases=("a", "b"))
    out = tmp_path / "prepared"
    real_write = prepare_module.sitk.WriteImage
    calls = {"n": 0}

    def interrupt_on_case_b(image, path, *args, **kwargs):
        calls["n"] += 1
        if "/b." in path.replace(os.sep, "/") or ".b." in Path(path).name:
            real_write(image, path, *args, **kwargs)  # the temp file exists ...
            raise KeyboardInterrupt  # ... and Ctrl-C arrives before the rename
        return real_write(image, path, *args, **kwargs)

    monkeypatch.setattr(prepare_module.sitk, "WriteImage", interrupt_on_case_b)
    with pytest.raises(KeyboardInterrupt):
        prepare_datasets([raw], out)
    monkeypatch.undo()
    assert not list(out.rglob(".*partial*"))
    assert not list(out.rglob("b.nii.gz"))
    assert {k[0] for k in _entries(out)} == {"a"}
    result = prepare_datasets([raw], out)
    assert (result.cases_prepared, result.cases_already_complete) == (1, 1)
    assert {k[0] for k in _entries(out)} == {"a", "b"}


def test_plain_rerun_removes_temporary_files_of_a_killed_run(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_datasets([raw], out)
    stale = out / "liver" / PHANTOM / "labelsTr" / ".case_a.nii.abcd1234.partial.nii.gz"
    stale.write_bytes(b"half a file")
    prepare_datasets([raw], out)
    assert not stale.exists()
    assert (out / "liver" / PHANTOM / "labelsTr" / "case_a.nii.gz").is_file()


def test_classes_added_later_are_prepared_on_rerun(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_datasets([raw], out, classes=["liver"])
    liver_mtime = (out / "liver" / PHANTOM / "labelsTr" / "case_a.nii.gz").stat().st_mtime_ns
    result = prepare_datasets([raw], out)
    assert result.cases_prepared == 1
    assert (out / "left_kidney" / PHANTOM / "labelsTr" / "case_a.nii.gz").is_file()
    assert (out / "liver" / PHANTOM / "labelsTr" / "case_a.nii.gz").stat().st_mtime_ns == liver_mtime


# -------------------------------------------------------------------------------- workers, shards
def test_workers_give_the_same_result(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw", cases=("a", "b", "c"))
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    prepare_datasets([raw], serial)
    progress = []
    prepare_datasets([raw], parallel, workers=2, progress=lambda done, total, what: progress.append((done, total)))
    assert progress[-1] == (3, 3)
    strip = lambda e: {k: v for k, v in e.items() if k not in ("prepared_at",)}  # noqa: E731
    assert [strip(e) for e in _manifest(serial)["entries"]] == [strip(e) for e in _manifest(parallel)["entries"]]
    for rel in all_files(serial):
        if rel.endswith(".nii.gz"):
            assert np.array_equal(read_ijk(serial / rel)[0], read_ijk(parallel / rel)[0])


def test_bad_case_in_a_worker_process_is_reported_the_same_way(tmp_path):
    bad = phantom_label()
    bad[0, 0, 0] = 200
    raw = make_v2_dataset(tmp_path / "raw", cases=("a", "b", "c"), label_arrays={"b": bad})
    out = tmp_path / "prepared"
    with pytest.raises(BadInputError, match=r"^Dataset900_Phantom case b: label value\(s\) 200 not in dataset.json labels"):
        prepare_datasets([raw], out, workers=2)
    assert "b" not in {k[0] for k in _entries(out)}
    assert not list(out.rglob("b.nii.gz")) and not list(out.rglob(".*partial*"))


def test_shards_split_cases_and_a_plain_run_merges(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw", cases=("a", "b", "c"))
    out = tmp_path / "prepared"
    one = prepare_datasets([raw], out, shard=(1, 2))
    two = prepare_datasets([raw], out, shard=(2, 2))
    assert (one.cases_total, two.cases_total) == (2, 1)
    assert not (out / "manifest.json").exists()
    shard_cases = [{e["case"] for e in json.loads((out / f"manifest.shard-{k}-of-2.json").read_text())["entries"]}
                   for k in (1, 2)]
    assert shard_cases == [{"a", "c"}, {"b"}]
    from fastsam3d_cli.data.prepared import list_prepared_samples

    assert {s.case for s in list_prepared_samples(out)} == {"a", "b", "c"}  # readable before merging
    merged = prepare_datasets([raw], out)
    assert (merged.cases_prepared, merged.cases_already_complete) == (0, 3)
    assert {k[0] for k in _entries(out)} == {"a", "b", "c"}
    assert not list(out.glob("manifest.shard-*"))


@pytest.mark.parametrize("text", ["0/2", "3/2", "1-2", "a/b", "2", "1/0"])
def test_invalid_shard(text):
    with pytest.raises(UsageError, match="--shard"):
        parse_shard(text)


def test_parse_shard_ok():
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None


# ------------------------------------------------------------------- volume-keeping grid placement
ONE_MM = (1.0, 1.0, 1.0)
ATLAS_SHAPE = (40, 36, 32)


def _atlas_like_dataset(parent: Path) -> tuple[Path, np.ndarray]:
    """1 mm data: class 1 a 24³ cube (a multiple of 3 voxels: exact on every 1.5 mm placement), class 2 a
    small ball whose volume the common 1.5 mm grid changes by more than 1% (checked in the test)."""
    label = np.zeros(ATLAS_SHAPE, dtype=np.uint8)
    label[3:27, 3:27, 3:27] = 1
    i, j, k = np.meshgrid(*[np.arange(n) for n in ATLAS_SHAPE], indexing="ij")
    label[(i - 33.3) ** 2 + (j - 20.6) ** 2 + (k - 15.2) ** 2 <= 3.4 ** 2] = 2
    label[30:36, 2:8, 2:8] = 3  # nnU-Net's ignore label: its mask must follow each class's grid
    raw = make_v2_dataset(parent, labels={"background": 0, "cube": 1, "ball": 2, "ignore": 3}, write_cases=False)
    write_volume(raw / "imagesTr" / "case_a_0000.nii.gz", phantom_image(ATLAS_SHAPE), spacing=ONE_MM)
    write_volume(raw / "labelsTr" / "case_a.nii.gz", label, spacing=ONE_MM)
    return raw, label


def _nearest_source_index(written: sitk.Image, source_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel of a written grid, the source voxel (ijk) nearest to its centre (clipped) and the
    continuous source index of the centre, by plain numpy.

    Source: spacing 1 mm, origin ORIGIN, direction RAS_STORED (as written above); clipped at the edges.
    """
    axes_out = np.asarray(written.GetDirection()).reshape(3, 3) * np.asarray(written.GetSpacing())
    axes_src = np.asarray(RAS_STORED).reshape(3, 3) * np.asarray(ONE_MM)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in written.GetSize()], indexing="ij"), axis=-1)
    physical = np.asarray(written.GetOrigin()) + grid @ axes_out.T
    continuous = (physical - np.asarray(ORIGIN)) @ np.linalg.inv(axes_src).T
    return np.clip(np.floor(continuous + 0.5).astype(int), 0, np.asarray(source_shape) - 1), continuous


def test_a_small_class_gets_the_grid_placement_that_keeps_its_volume(tmp_path):
    raw, label = _atlas_like_dataset(tmp_path / "raw")
    out, shared = tmp_path / "prepared", tmp_path / "shared"
    prepare_datasets([raw], out)
    from typer.testing import CliRunner

    from fastsam3d_cli.cli import app

    done = CliRunner().invoke(app, ["prepare", str(raw), "-o", str(shared), "--shared-grid", "--json"], env=CLI_ENV)
    assert done.exit_code == 0, done.output
    entries, shared_entries = _entries(out), _entries(shared)
    source_ball = float((label == 2).sum())
    error_shared = shared_entries[("case_a", "ball")]["resampled_voxels"] * 1.5 ** 3 / source_ball - 1
    error = entries[("case_a", "ball")]["resampled_voxels"] * 1.5 ** 3 / source_ball - 1
    assert abs(error_shared) > 0.01  # the premise: the common grid changes the ball's volume by over 1%
    assert abs(error) <= 0.01, (error, error_shared)
    assert entries[("case_a", "ball")]["grid_shift_mm"] != [0.0, 0.0, 0.0]
    assert all(abs(v) <= 1 / 3 + 1e-6 for v in entries[("case_a", "ball")]["grid_shift_mm"])
    # The cube keeps its volume everywhere: it stays on the common grid, exactly 16³ voxels.
    assert entries[("case_a", "cube")]["grid_shift_mm"] == [0.0, 0.0, 0.0]
    assert entries[("case_a", "cube")]["resampled_voxels"] == 16 ** 3
    assert {tuple(e["grid_shift_mm"]) for e in shared_entries.values() if e["status"] == "written"} == {(0.0, 0.0, 0.0)}

    # On its own grid the ball is still a plain nearest-neighbour sample of the source, and its image is the
    # linear resampling of the source (a ramp along i: 100 + 8·i) onto that same grid.
    ball_label, ball_label_image = read_ijk(out / "ball" / PHANTOM / "labelsTr" / "case_a.nii.gz")
    ball_image, ball_image_image = read_ijk(out / "ball" / PHANTOM / "imagesTr" / "case_a.nii.gz")
    assert ball_label_image.GetOrigin() == ball_image_image.GetOrigin()
    assert ball_label_image.GetSize() == ball_image_image.GetSize()
    nearest, continuous = _nearest_source_index(ball_label_image, ATLAS_SHAPE)
    expected = (label[nearest[..., 0], nearest[..., 1], nearest[..., 2]] == 2).astype(np.uint8)
    assert np.array_equal(ball_label, expected)
    ignore, ignore_image = read_ijk(out / "ball" / PHANTOM / "ignoreTr" / "case_a.nii.gz")
    assert ignore_image.GetOrigin() == ball_label_image.GetOrigin()
    assert np.array_equal(ignore, (label[nearest[..., 0], nearest[..., 1], nearest[..., 2]] == 3).astype(np.uint8))
    assert entries[("case_a", "ball")]["ignore_voxels"] == int(ignore.sum()) > 0
    ramp = 100 + 8 * np.clip(continuous[..., 0], 0, ATLAS_SHAPE[0] - 1)
    assert np.abs(ball_image.astype(float) - ramp).max() <= 0.5 + 1e-6  # rounded back to int16
    # The shift is sub-voxel: the ball's grid is the common grid moved by less than half a source voxel.
    cube_image = read_ijk(out / "cube" / PHANTOM / "imagesTr" / "case_a.nii.gz")[1]
    moved = np.linalg.norm(np.subtract(ball_image_image.GetOrigin(), cube_image.GetOrigin()))
    assert 0 < moved < 0.5 * np.sqrt(3)

    data_files = {k: v for k, v in all_files(out).items() if k != "manifest.json"}
    again = prepare_datasets([raw], out)
    assert again.cases_prepared == 0  # idempotent with per-class grids too: nothing rewritten
    assert {k: v for k, v in all_files(out).items() if k != "manifest.json"} == data_files


def test_a_script_without_a_main_guard_gets_a_clear_error(tmp_path):
    """Worker processes re-import the calling script; without the guard they die at start. That is reported
    as one clear error naming the guard, not a BrokenProcessPool traceback, and nothing is written."""
    import subprocess
    import sys

    raw = make_v2_dataset(tmp_path / "raw", cases=("a", "b"))
    script = tmp_path / "unguarded.py"
    script.write_text("from fastsam3d_cli.data.prepare import prepare_datasets\n"
                      f"prepare_datasets([{str(raw)!r}], {str(tmp_path / 'out')!r}, workers=2)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    # The error is the traceback's last exception; Python's resource tracker may print a warning after it
    # (semaphores of the broken pool), which is not ours to silence in a user's script.
    errors = [line for line in done.stderr.splitlines()
              if line.startswith("fastsam3d_cli.errors.DeviceError: a prepare worker process died")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert 'if __name__ == "__main__":' in errors[0] and "use fewer --workers" in errors[0]
    assert not (tmp_path / "out").exists()


def _nn_counts_all_placements(label: np.ndarray, value: int) -> list[int]:
    """Voxels of `value` that nearest-neighbour sampling at 1.5 mm keeps, for each of the 27 distinct
    placements over a 1 mm grid (three ways per axis to take two of every three planes), by plain numpy."""
    counts = []
    for offsets in np.ndindex(3, 3, 3):
        picked = [np.flatnonzero((np.arange(n) - o) % 3 != 2) for n, o in zip(label.shape, offsets)]
        counts.append(int((label[np.ix_(*picked)] == value).sum()))
    return counts


def test_placement_counts_a_class_the_common_grid_only_partly_sees(tmp_path):
    """A ball plus a one-voxel sheet far from it: the search must count the sheet on every placement (it
    bounds the search by the class's source voxels, not by what the common grid kept)."""
    label = np.zeros(ATLAS_SHAPE, dtype=np.uint8)
    i, j, k = np.meshgrid(*[np.arange(n) for n in ATLAS_SHAPE], indexing="ij")
    label[(i - 10.3) ** 2 + (j - 12.6) ** 2 + (k - 11.2) ** 2 <= 3.6 ** 2] = 1
    label[31, 4:30, 4:28] = 1  # the sheet: one plane, which some placements skip entirely
    raw = make_v2_dataset(tmp_path / "raw", labels={"background": 0, "organ": 1}, write_cases=False)
    write_volume(raw / "imagesTr" / "case_a_0000.nii.gz", phantom_image(ATLAS_SHAPE), spacing=ONE_MM)
    write_volume(raw / "labelsTr" / "case_a.nii.gz", label, spacing=ONE_MM)
    prepare_datasets([raw], tmp_path / "out")
    entry = _entries(tmp_path / "out")[("case_a", "organ")]
    expected = (label == 1).sum() / 3.375
    error = abs(entry["resampled_voxels"] - expected) / expected
    best = min(abs(c - expected) / expected for c in _nn_counts_all_placements(label, 1))
    assert error <= max(0.01, best) + 1e-9, (error, best)
    written = read_ijk(tmp_path / "out" / "organ" / PHANTOM / "labelsTr" / "case_a.nii.gz")[0]
    assert int(written.sum()) == entry["resampled_voxels"]  # the count the search predicted is what was written


def test_a_class_the_common_grid_loses_is_written_on_a_placement_that_keeps_it(tmp_path):
    """A one-voxel line at i = j = 1 (16 mm³): the common 1.5 mm grid samples planes 0, 2, 3, ... and misses
    it; a placement that samples plane 1 keeps it, so it is written, not reported empty."""
    label = np.zeros((12, 12, 20), dtype=np.uint8)
    label[1, 1, 2:18] = 1
    raw = make_v2_dataset(tmp_path / "raw", labels={"background": 0, "line": 1}, write_cases=False)
    write_volume(raw / "imagesTr" / "case_a_0000.nii.gz", phantom_image(label.shape), spacing=ONE_MM)
    write_volume(raw / "labelsTr" / "case_a.nii.gz", label, spacing=ONE_MM)
    prepare_datasets([raw], tmp_path / "shared", shared_grid=True)
    assert _entries(tmp_path / "shared")[("case_a", "line")]["reason_code"] == "empty_after_resampling"
    prepare_datasets([raw], tmp_path / "out")
    entry = _entries(tmp_path / "out")[("case_a", "line")]
    assert entry["status"] == "written" and entry["resampled_voxels"] > 0 and any(entry["grid_shift_mm"])
    written, image = read_ijk(tmp_path / "out" / "line" / PHANTOM / "labelsTr" / "case_a.nii.gz")
    nearest, _ = _nearest_source_index(image, label.shape)
    assert np.array_equal(written, label[nearest[..., 0], nearest[..., 1], nearest[..., 2]])


def test_placements_do_not_depend_on_which_classes_a_run_prepares(tmp_path):
    """Each class's placement is its own choice: preparing some classes first (--classes, or a resumed run)
    gives the same files as preparing all at once."""
    label = np.zeros(ATLAS_SHAPE, dtype=np.uint8)
    i, j, k = np.meshgrid(*[np.arange(n) for n in ATLAS_SHAPE], indexing="ij")
    centres = [(8.3, 8.6, 8.2), (8.7, 25.1, 9.4), (25.2, 9.9, 22.6), (24.4, 26.3, 21.1), (33.6, 17.2, 15.8)]
    for value, (a, b, c) in enumerate(centres, start=1):
        label[(i - a) ** 2 + (j - b) ** 2 + (k - c) ** 2 <= 3.3 ** 2] = value
    names = [f"ball{v}" for v in range(1, len(centres) + 1)]
    raw = make_v2_dataset(tmp_path / "raw", labels={"background": 0, **{n: v for v, n in enumerate(names, 1)}},
                          write_cases=False)
    write_volume(raw / "imagesTr" / "case_a_0000.nii.gz", phantom_image(ATLAS_SHAPE), spacing=ONE_MM)
    write_volume(raw / "labelsTr" / "case_a.nii.gz", label, spacing=ONE_MM)
    prepare_datasets([raw], tmp_path / "all")
    for name in names[::2]:
        prepare_datasets([raw], tmp_path / "parts", classes=[name])
    prepare_datasets([raw], tmp_path / "parts")
    whole, parts = _entries(tmp_path / "all"), _entries(tmp_path / "parts")
    assert sum(any(e["grid_shift_mm"]) for e in whole.values()) >= 2  # several classes moved
    assert {k: e["grid_shift_mm"] for k, e in whole.items()} == {k: e["grid_shift_mm"] for k, e in parts.items()}
    for name in names:
        a = read_ijk(tmp_path / "all" / name / PHANTOM / "labelsTr" / "case_a.nii.gz")
        b = read_ijk(tmp_path / "parts" / name / PHANTOM / "labelsTr" / "case_a.nii.gz")
        assert np.array_equal(a[0], b[0]) and a[1].GetOrigin() == b[1].GetOrigin()


def test_resampled_labels_are_zero_outside_the_label_file_on_a_moved_grid_too(tmp_path):
    """--resample-labels with a label covering only part of the image: on a moved grid, as on the common one,
    what lies outside the label file is background (no copies of its edge values)."""
    big = (48, 44, 40)
    label = np.zeros((30, 30, 30), dtype=np.uint8)
    i, j, k = np.meshgrid(*[np.arange(30)] * 3, indexing="ij")
    label[(i - 15.3) ** 2 + (j - 14.6) ** 2 + (k - 15.2) ** 2 <= 3.4 ** 2] = 2
    label[26:30, 10:20, 10:20] = 1  # touches the label file's last i plane
    label[0:3, 0:30, 0:30] = 3  # ignore, along the label file's first i plane
    raw = make_v2_dataset(tmp_path / "raw", labels={"background": 0, "edge": 1, "ball": 2, "ignore": 3},
                          write_cases=False)
    write_volume(raw / "imagesTr" / "case_a_0000.nii.gz", phantom_image(big), spacing=ONE_MM)
    label_origin = tuple(o + d * 5.0 for o, d in zip(ORIGIN, (-1.0, -1.0, 1.0)))  # 5 voxels in, RAS-stored
    write_volume(raw / "labelsTr" / "case_a.nii.gz", label, spacing=ONE_MM, origin=label_origin)
    prepare_datasets([raw], tmp_path / "out", resample_labels=True)
    entries = _entries(tmp_path / "out")
    for name, value in (("edge", 1), ("ball", 2)):
        entry = entries[("case_a", name)]
        written, image = read_ijk(tmp_path / "out" / name / PHANTOM / "labelsTr" / "case_a.nii.gz")
        physical = _grid_points(image)
        continuous = (physical - np.asarray(label_origin)) @ np.linalg.inv(np.asarray(RAS_STORED).reshape(3, 3)).T
        nearest = np.floor(continuous + 0.5).astype(int)
        inside = np.all((continuous >= -0.5) & (continuous <= np.asarray(label.shape) - 0.5), axis=-1)
        clipped = np.clip(nearest, 0, np.asarray(label.shape) - 1)
        sampled = np.where(inside, label[clipped[..., 0], clipped[..., 1], clipped[..., 2]], 0)
        assert np.array_equal(written, (sampled == value).astype(np.uint8)), name
        if entry["ignore_path"]:
            ignore = read_ijk(tmp_path / "out" / entry["ignore_path"])[0]
            assert np.array_equal(ignore, (sampled == 3).astype(np.uint8))
    assert any(entries[("case_a", n)]["grid_shift_mm"] != [0.0, 0.0, 0.0] for n in ("edge", "ball"))


def _grid_points(image: sitk.Image) -> np.ndarray:
    """Physical (LPS) position of every voxel centre of an image, ijk-indexed."""
    axes = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.GetSize()], indexing="ij"), axis=-1)
    return np.asarray(image.GetOrigin()) + grid @ axes.T
