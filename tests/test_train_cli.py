"""`fastsam3d train` on the command line: --json, and one clear line + exit code per bad input, nothing written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from fastsam3d_cli.model.checkpoint import load_model, read_checkpoint, read_checkpoint_info
from distill_builders import distil_student, register_preset
from train_phantoms import CLI_ENV, add_empty_label, make_prepared, tree, write_volume

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["train", *args], env=CLI_ENV)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("data") / "prepared", cases=("p0",))


@pytest.fixture(scope="module")
def tiny_run(prepared, tmp_path_factory):
    """A finished 1-step fastsam3d-tiny run (its last.pth serves as --init / --resume input)."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = _run(str(prepared), "--model", "fastsam3d-tiny", "-o", str(run), "--epochs", "1", "--max-steps", "1",
                  "--iterations", "1", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


def test_json_summary_is_one_object_and_the_run_folder_is_complete(tiny_run):
    run, payload = tiny_run
    assert payload["model"] == "fastsam3d-tiny" and payload["global_step"] == 1 and payload["stop_reason"] == "max_steps"
    assert payload["checkpoints"]["last"] == str(run / "last.pth") and payload["samples"] == 2
    assert {p.name for p in run.iterdir()} >= {"last.pth", "steps.jsonl", "metrics.jsonl", "train.png"}


def test_table_output_and_resume_to_the_end_of_the_epoch(prepared, tmp_path):
    run = tmp_path / "run"
    first = _run(str(prepared), "-m", "fastsam3d-tiny", "-o", str(run), "--epochs", "1", "--max-steps", "1",
                 "--iterations", "1", "--device", "cpu")
    assert first.exit_code == 0, first.output
    assert "max_steps: 0 epoch(s), 1 step(s) on 2 sample(s)" in first.stdout
    again = _run(str(prepared), "-m", "fastsam3d-tiny", "-o", str(run), "--epochs", "1", "--iterations", "1",
                 "--device", "cpu", "--resume")
    assert again.exit_code == 0, again.output
    assert "resumed from" in again.stderr and "completed: 1 epoch(s), 2 step(s)" in again.stdout
    row = next(line for line in again.stdout.splitlines() if line.startswith("│     1 │"))  # the epoch table
    assert [cell.strip() for cell in row.split("│")[1:3]] == ["1", "2"] and row.rstrip("│ ").endswith("best")


def _fails(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("fastsam3d: error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]
    return error_lines[0]


def test_empty_dataset_is_exit_3_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run(str(empty), "-m", "fastsam3d-tiny", "-o", str(tmp_path / "run"))
    _fails(result, 3, "holds no prepared samples", "fastsam3d prepare")
    assert not (tmp_path / "run").exists()


def test_wrong_layout_is_exit_3(tmp_path, prepared):
    loose = tmp_path / "loose"
    image = next(prepared.rglob("imagesTr/*.nii.gz"))
    write_volume(loose / "imagesTr" / "case.nii.gz", __import__("numpy").zeros((4, 4, 4), "uint8"))
    (loose / "case.nii.gz").write_bytes(image.read_bytes())
    result = _run(str(loose), "-m", "fastsam3d-tiny", "-o", str(tmp_path / "run"))
    _fails(result, 3, "holds no prepared samples")
    assert not (tmp_path / "run").exists()


def test_init_checkpoint_of_another_model_is_exit_4_with_the_key_diff(prepared, tiny_run, tmp_path):
    run, _ = tiny_run
    result = _run(str(prepared), "-m", "fastsam3d", "--init", str(run / "last.pth"), "-o", str(tmp_path / "run"))
    _fails(result, 4, "does not fit model 'fastsam3d'", "--model fastsam3d-tiny")
    assert "wrong shape" in result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_with_another_model_is_exit_4_and_keeps_the_run(prepared, tiny_run):
    run, _ = tiny_run
    before = tree(run)
    result = _run(str(prepared), "-m", "fastsam3d", "-o", str(run), "--resume")
    _fails(result, 4, "checkpoint of model 'fastsam3d-tiny', not 'fastsam3d'", "--model fastsam3d-tiny")
    assert tree(run) == before


def test_resume_without_a_checkpoint_is_exit_3(prepared, tmp_path):
    (tmp_path / "run").mkdir()
    result = _run(str(prepared), "-m", "fastsam3d-tiny", "-o", str(tmp_path / "run"), "--resume")
    _fails(result, 3, "--resume but", "holds no last.pth")
    assert tree(tmp_path / "run") == {}


def test_resume_from_a_plain_weights_file_is_exit_4(prepared, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model_state_dict": {"mask_decoder.iou_token.weight": torch.zeros(1, 384)}}, run / "last.pth")
    before = tree(run)
    result = _run(str(prepared), "-m", "fastsam3d-tiny", "-o", str(run), "--resume")
    _fails(result, 4, "not a fastsam3d training checkpoint", "--init")
    assert tree(run) == before


def test_new_run_into_an_existing_run_is_exit_3_and_loses_nothing(prepared, tiny_run):
    run, _ = tiny_run
    before = tree(run)
    result = _run(str(prepared), "-m", "fastsam3d-tiny", "-o", str(run))
    _fails(result, 3, "already holds a training run", "--resume")
    assert tree(run) == before


def test_run_folder_that_cannot_be_created_is_exit_3(prepared, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = _run(str(prepared), "-m", "fastsam3d-tiny", "-o", str(blocker / "run"))
    _fails(result, 3, "cannot be created", "is a file")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_run_folder_is_exit_3(prepared, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = _run(str(prepared), "-m", "fastsam3d-tiny", "-o", str(locked / "run"))
        _fails(result, 3, "is not writable")
    finally:
        locked.chmod(0o700)


def test_unwritable_run_folder_is_exit_3_even_as_root(prepared, tmp_path, monkeypatch):
    # Root may write into a read-only folder, so the permission answer is simulated for that folder only.
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    try:
        result = _run(str(prepared), "-m", "fastsam3d-tiny", "-o", str(locked / "run"), "--device", "cpu")
        line = _fails(result, 3, f"run folder {locked / 'run'} is not writable", "--output")
        assert result.stderr.strip() == line  # the one line, nothing else
        assert tree(locked) == {} and not (locked / "run").exists()
    finally:
        locked.chmod(0o700)


def test_run_folder_the_file_system_refuses_is_exit_3(prepared, tmp_path, monkeypatch):
    """The checks pass but mkdir fails (a virtual or read-only file system such as /proc): one line, exit 3,
    not an internal error."""
    import errno

    target = tmp_path / "virtual" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == target:
            raise OSError(errno.ENOENT, "No such file or directory")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    result = _run(str(prepared), "-m", "fastsam3d-tiny", "-o", str(target), "--device", "cpu", "--max-steps", "1")
    _fails(result, 3, f"run folder {target} cannot be created: No such file or directory", "--output")
    assert not target.exists()


def test_empty_label_is_skipped_with_a_warning(tmp_path, monkeypatch):
    model = register_preset(monkeypatch)
    root = make_prepared(tmp_path / "prepared", cases=("p0",))
    add_empty_label(root)
    args = [str(root), "-m", model, "--epochs", "1", "--iterations", "1", "--device", "cpu"]
    result = _run(*args, "-o", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "warning: CT_Dataset990_Phantom/p0/void: the label is empty" in result.stderr
    assert "completed: 1 epoch(s), 2 step(s) on 2 sample(s)" in result.stdout
    as_json = _run(*args, "-o", str(tmp_path / "run-json"), "--json")
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["samples"] == 2 and payload["empty_samples"] == payload["excluded_samples"] == 1
    assert any(w.startswith("CT_Dataset990_Phantom/p0/void: the label is empty") for w in payload["warnings"])


def test_only_empty_labels_is_exit_3_before_the_run_folder_exists(tmp_path):
    root = tmp_path / "prepared"
    add_empty_label(root, case="p0")
    add_empty_label(root, case="p1")
    result = _run(str(root), "-m", "fastsam3d-tiny", "-o", str(tmp_path / "run"), "--device", "cpu")
    line = _fails(result, 3, "every prepared label is empty (2 sample(s): CT_Dataset990_Phantom/p0/void, "
                             "CT_Dataset990_Phantom/p1/void)", "fastsam3d prepare")
    assert result.stderr.strip() == line
    assert not (tmp_path / "run").exists()


def test_decoder_fine_tune_of_a_distilled_student(tmp_path, monkeypatch):
    # FastSAM3D's second step: `train --init student.pth --freeze-encoder` on a real (small) distillation output.
    model = register_preset(monkeypatch)
    root = make_prepared(tmp_path / "prepared", cases=("p0",))
    student = distil_student(root, tmp_path)
    run = tmp_path / "tuned"
    result = _run(str(root), "-m", model, "--init", str(student), "--freeze-encoder", "--epochs", "1",
                  "--iterations", "2", "--device", "cpu", "-o", str(run), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["stop_reason"] == "completed" and payload["global_step"] == 2
    source, tuned = read_checkpoint(student), read_checkpoint(run / "last.pth")
    assert source.keys() == tuned.keys()
    changed = {k for k in source if not torch.equal(source[k], tuned[k])}
    assert not any(k.startswith("image_encoder.") for k in changed)  # the student encoder is kept as distilled
    assert any(k.startswith("mask_decoder.") for k in changed) and any(k.startswith("prompt_encoder.") for k in changed)
    # Both checkpoints load as the model; the frozen encoder is not in the optimizer.
    for name in ("last.pth", "best.pth"):
        loaded, info = load_model(run / name, preset=model, device="cpu")
        assert info.layout == "training" and loaded.config.name == model
    checkpoint = torch.load(run / "last.pth", weights_only=True)
    assert [g["name"] for g in checkpoint["optimizer_state_dict"]["param_groups"]] == ["prompt_encoder+mask_decoder"]
    assert read_checkpoint_info(run / "last.pth")[1].config["name"] == model


@pytest.mark.parametrize("args, fragment", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--accumulate", "0"], "--accumulate must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr-milestones", "6o"], "not a comma-separated list of integers"),
    (["-m", "vit-h"], "unknown model 'vit-h'"),
    (["--classes", ","], "--classes ',' names no class"),  # not "all classes"
])
def test_bad_numbers_and_names_are_usage_errors(prepared, tmp_path, args, fragment):
    base = {"-m": "fastsam3d-tiny"}
    argv = [str(prepared), "-o", str(tmp_path / "run")]
    if "-m" not in args:
        argv += ["-m", base["-m"]]
    result = _run(*argv, *args)
    _fails(result, 2, fragment)
    assert not (tmp_path / "run").exists()
