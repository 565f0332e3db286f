"""`fastsam3d prepare` on the command line: output, --json, and one clear line + exit code per bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from prepare_phantoms import CLI_ENV, ORIGIN, all_files, make_v1_task, make_v2_dataset, phantom_label, write_volume

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["prepare", *args], env=CLI_ENV)


def test_table_and_summary(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw", cases=("a", "b"))
    out = tmp_path / "prepared"
    result = _run(str(raw), "-o", str(out), "--min-volume-mm3", "100")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    liver = next(line for line in lines if line.strip("│ ").startswith("liver"))
    cells = [cell.strip() for cell in liver.split("│")[1:-1]]
    assert cells == ["liver", "2", "0", "0", "3.46", "Dataset900_Phantom"]  # 2 cases × 1.728 mL
    tiny = next(line for line in lines if line.strip("│ ").startswith("tiny"))
    assert [cell.strip() for cell in tiny.split("│")[1:-1]][:4] == ["tiny", "0", "2", "0"]
    assert "2 case(s): 2 prepared, 0 already complete" in result.stdout
    assert "Skipped as too small or empty after resampling: Dataset900_Phantom/a/tiny (27 mm³)" in result.stdout
    again = _run(str(raw), "-o", str(out), "--min-volume-mm3", "100")
    assert again.exit_code == 0 and "2 case(s): 0 prepared, 2 already complete" in again.stdout


def test_json_is_one_object_on_stdout(tmp_path):
    v2 = make_v2_dataset(tmp_path / "raw")
    v1 = make_v1_task(tmp_path / "raw")
    out = tmp_path / "prepared"
    result = _run(str(v2), str(v1), "-o", str(out), "--json", "--classes", "liver,left kidney", "--workers", "2")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["cases"] == {"total": 2, "prepared": 2, "already_complete": 0}
    assert [(c["class"], c["written"], c["datasets"]) for c in payload["classes"]] == [
        ("left_kidney", 2, ["Dataset900_Phantom", "Task900_Phantom"]),
        ("liver", 2, ["Dataset900_Phantom", "Task900_Phantom"])]
    assert {d["format"] for d in payload["datasets"]} == {"v1", "v2"}
    assert payload["manifest"] == str(out / "manifest.json")


def test_shard_option(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw", cases=("a", "b"))
    out = tmp_path / "prepared"
    result = _run(str(raw), "-o", str(out), "--shard", "2/2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shard"] == "2/2"
    assert (out / "manifest.shard-2-of-2.json").is_file()


def _break_no_json(raw: Path) -> None:
    (raw / "dataset.json").unlink()


def _break_invalid_json(raw: Path) -> None:
    (raw / "dataset.json").write_text('{"channel_names": {"0": "CT"},')


def _break_missing_keys(raw: Path) -> None:
    meta = json.loads((raw / "dataset.json").read_text())
    del meta["file_ending"], meta["numTraining"]
    (raw / "dataset.json").write_text(json.dumps(meta))


def _break_missing_image(raw: Path) -> None:
    (raw / "imagesTr" / "b_0000.nii.gz").rename(raw / "imagesTr" / "b_0001.nii.gz")


def _break_missing_label(raw: Path) -> None:
    (raw / "labelsTr" / "b.nii.gz").unlink()


def _break_empty_label(raw: Path) -> None:
    (raw / "labelsTr" / "b.nii.gz").write_bytes(b"")


def _break_unreadable_label(raw: Path) -> None:
    (raw / "labelsTr" / "b.nii.gz").write_bytes(b"not a nifti at all" * 10)


def _break_label_value(raw: Path) -> None:
    label = phantom_label()
    label[19, 15, 11] = 7
    write_volume(raw / "labelsTr" / "b.nii.gz", label)


def _break_grid(raw: Path) -> None:
    write_volume(raw / "labelsTr" / "b.nii.gz", phantom_label(), spacing=(3.0, 3.0, 2.5))


def _break_4d(raw: Path) -> None:
    import nibabel as nib

    image = np.zeros((20, 16, 12, 2), np.int16)
    nib.save(nib.Nifti1Image(image, np.diag([3.0, 3.0, 3.0, 1.0])), str(raw / "imagesTr" / "b_0000.nii.gz"))


BAD_INPUTS = [
    (_break_no_json, r"^fastsam3d: error: .*Dataset900_Phantom has no dataset.json — "),
    (_break_invalid_json, r"dataset.json is not valid JSON at line 1 column \d+: Expecting"),
    (_break_missing_keys, r"\(nnU-Net v2\) is missing required key\(s\): numTraining, file_ending — "),
    (_break_missing_image, r"Dataset900_Phantom case b: no image for channel 0 \(expected .*b_0000.nii.gz\)"),
    (_break_missing_label, r"Dataset900_Phantom case b: label file .*b.nii.gz does not exist"),
    (_break_empty_label, r"Dataset900_Phantom case b: label file .*b.nii.gz is empty"),
    (_break_unreadable_label, r"Dataset900_Phantom case b: cannot read label .*b.nii.gz"),
    (_break_label_value, r"Dataset900_Phantom case b: label value\(s\) 7 not in dataset.json labels \(0..4\)"),
    (_break_grid, r"Dataset900_Phantom case b: image and label grids differ \(spacing \(3, 3, 3\) vs \(3, 3, 2.5\)\) — .*--resample-labels"),
    # Issue 15.15: --channel picks a CASE_XXXX file in this layout, so "choose one with --channel N" could not help.
    (_break_4d, r"Dataset900_Phantom case b: image .*b_0000.nii.gz is 4D with 2 channels, but this dataset keeps one 3D "
                r"channel per file .* — split the 4D file into one 3D file per channel"),
]


@pytest.mark.parametrize("breaker,message", BAD_INPUTS, ids=[b.__name__[7:] for b, _ in BAD_INPUTS])
def test_bad_input_one_line_exit_3_nothing_written(tmp_path, breaker, message):
    raw = make_v2_dataset(tmp_path / "raw", cases=("b",))
    breaker(raw)
    before = all_files(raw)
    out = tmp_path / "prepared"
    result = _run(str(raw), "-o", str(out))
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
    assert result.stdout == ""
    assert not out.exists()  # nothing written
    assert all_files(raw) == before  # input untouched


def test_bad_second_dataset_writes_nothing_and_loses_nothing(tmp_path):
    """A bad dataset.json anywhere stops before any case is prepared; earlier outputs stay intact."""
    good = make_v2_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    assert _run(str(good), "-o", str(out)).exit_code == 0
    before = all_files(out)
    bad = make_v1_task(tmp_path / "raw")
    _break_invalid_json(bad)
    result = _run(str(good), str(bad), "-o", str(out))
    assert result.exit_code == 3 and "Task900_Phantom/dataset.json is not valid JSON" in result.stderr
    assert all_files(out) == before


def test_output_inside_input(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    before = all_files(raw)
    result = _run(str(raw), "-o", str(raw / "imagesTr" / "prepared"))
    assert result.exit_code == 3
    assert len(result.stderr.strip().splitlines()) == 1
    assert "is inside input dataset" in result.stderr and "inputs are never modified" in result.stderr
    assert all_files(raw) == before


def test_unknown_class_lists_available(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    result = _run(str(raw), "-o", str(tmp_path / "prepared"), "--classes", "liver,pancreas")
    assert result.exit_code == 3
    assert result.stderr.strip() == ("fastsam3d: error: unknown class(es) pancreas; available: absent_organ, "
                                     "left_kidney, liver, tiny — use class names as dataset.json spells them (spaces → _)")
    assert not (tmp_path / "prepared").exists()


def test_multichannel_without_channel(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw", channel_names={"0": "T2", "1": "ADC"})
    result = _run(str(raw), "-o", str(tmp_path / "prepared"))
    assert result.exit_code == 3
    assert "has 2 channels (0=T2, 1=ADC) — choose one with --channel N" in result.stderr
    ok = _run(str(raw), "-o", str(tmp_path / "prepared"), "--channel", "1")
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "prepared" / "liver" / "ADC_Dataset900_Phantom" / "imagesTr" / "case_a.nii.gz").is_file()


def test_grid_mismatch_resample_labels_flag(tmp_path):
    raw = make_v2_dataset(tmp_path / "raw")
    write_volume(raw / "labelsTr" / "case_a.nii.gz", phantom_label(), origin=tuple(o + 0.01 for o in ORIGIN))
    assert _run(str(raw), "-o", str(tmp_path / "p1")).exit_code == 3
    result = _run(str(raw), "-o", str(tmp_path / "p2"), "--resample-labels")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args,message", [
    (["--shard", "3/2"], "--shard '3/2' is invalid"),
    (["--shard", "0/2"], "--shard '0/2' is invalid"),
    (["--shard", "x"], "--shard 'x' is invalid"),
    (["--spacing", "0"], "--spacing 0.0 is invalid"),
    (["--workers", "0"], "--workers 0 is invalid"),
    (["--classes", ","], "--classes ',' names no class"),
    (["--classes", ""], "--classes '' names no class"),
])
def test_usage_errors_exit_2(tmp_path, args, message):
    raw = make_v2_dataset(tmp_path / "raw")
    result = _run(str(raw), "-o", str(tmp_path / "prepared"), *args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "prepared").exists()
