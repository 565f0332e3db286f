"""`fastsam3d distill` on the command line: a short run, resume, and every bad-input rule (line, exit code, no writes)."""
from __future__ import annotations

import errno
import json
import pytest
from typer.testing import CliRunner

from fastsam3d_cli.training import feature_cache
from fastsam3d_cli.cli import app
from fastsam3d_cli.training.distill import distill
from distill_builders import CLI_ENV, STUDENT, TEACHER, TINY_COMPATIBLE_TEACHER, save_teacher
from train_phantoms import make_prepared, tree

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_cli")
    prepared = make_prepared(root / "prepared", cases=("p0",))  # 2 samples: ball, egg
    return {"root": root, "prepared": prepared,
            "teacher": save_teacher(root / "teacher.pth", TINY_COMPATIBLE_TEACHER),
            "small_teacher": save_teacher(root / "small_teacher.pth", TEACHER)}


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args], env=CLI_ENV)
    return result, result.stdout, result.stderr


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("fastsam3d: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_short_run_then_resume(setup, tmp_path):
    run_dir = tmp_path / "run"
    base = ["distill", setup["prepared"], "--teacher", setup["teacher"], "--teacher-model", "auto",
            "--student", "fastsam3d-tiny", "-o", run_dir, "--epochs-per-stage", "1", "--lr", "1e-4"]
    result, out, err = invoke(*base, "--max-steps", "1", "--json")
    assert result.exit_code == 0, err
    summary = json.loads(out)
    assert summary["stop_reason"] == "max_steps" and summary["global_step"] == 1
    assert summary["student"] == "fastsam3d-tiny" and summary["student_checkpoint"] is None
    assert summary["cache"]["computed_now"] == 2 and summary["cache"]["dtype"] == "float16"
    # 2 samples × (crop 128³ + 6 blocks of 8³×48 + neck 384×8³) × 2 bytes, plus the header
    record_bytes = 2 * (128 ** 3 + 6 * 512 * 48 + 384 * 512)
    assert 2 * record_bytes < summary["cache"]["bytes"] < 2 * record_bytes + 64_000
    assert summary["neck_mse"]["init"] > 0
    result, out, err = invoke(*base, "--max-steps", "3", "--resume")
    assert result.exit_code == 0, err
    assert "resumed from" in err and "Not finished yet: continue with --resume" in out
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [(s["step"], s["stage"]) for s in steps] == [(1, 1), (2, 1), (3, 2)]  # 2 steps per stage


def test_teacher_of_the_wrong_preset_exit_4(setup, tmp_path):
    result, _, err = invoke("distill", setup["prepared"], "--teacher", setup["teacher"], "--student",
                            "fastsam3d-tiny", "-o", tmp_path / "run")
    assert result.exit_code == 4
    assert "does not fit model 'sam-med3d'" in error_line(err)
    assert "with --teacher-model" in error_line(err)  # distill's option, not infer's --model
    assert not (tmp_path / "run").exists()


def test_student_init_of_the_wrong_preset_exit_4(setup, tmp_path):
    result, _, err = invoke("distill", setup["prepared"], "--teacher", setup["teacher"], "--teacher-model", "auto",
                            "--student", "fastsam3d-tiny", "--student-init", setup["teacher"], "-o", tmp_path / "run")
    assert result.exit_code == 4
    assert "does not fit model 'fastsam3d-tiny'" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_teacher_that_does_not_fit_the_student_exit_4(setup, tmp_path):
    result, _, err = invoke("distill", setup["prepared"], "--teacher", setup["small_teacher"], "--teacher-model",
                            "auto", "--student", "fastsam3d-tiny", "-o", tmp_path / "run")
    assert result.exit_code == 4
    assert "teacher 'test-teacher' and student 'fastsam3d-tiny' do not fit together (crop size 64 vs 128" \
        in error_line(err)
    assert not (tmp_path / "run").exists()


def test_cache_from_another_teacher_exit_3(setup, tmp_path):
    cache = tmp_path / "cache"
    base = ["distill", setup["prepared"], "--teacher-model", "auto", "--student", "fastsam3d-tiny",
            "--cache-features", cache]
    result, _, err = invoke(*base, "--teacher", setup["teacher"], "-o", tmp_path / "first", "--max-steps", "1")
    assert result.exit_code == 0, err
    before = tree(cache)
    other = save_teacher(tmp_path / "other.pth", TINY_COMPATIBLE_TEACHER, seed=9)  # same architecture, other weights
    result, _, err = invoke(*base, "--teacher", other, "-o", tmp_path / "run")
    assert result.exit_code == 3
    line = error_line(err)
    assert f"feature cache {cache} was made by another teacher (tiny-compatible-teacher, checkpoint sha256" in line
    assert f"use another --cache-features folder, or delete {cache}" in line
    assert tree(cache) == before
    assert not (tmp_path / "run").exists()
    # Resuming the first run with the other teacher is a weights mismatch of the run (exit 4), reported
    # before the cache's own check.
    run_before = tree(tmp_path / "first")
    result, _, err = invoke(*base, "--teacher", other, "-o", tmp_path / "first", "--resume")
    assert result.exit_code == 4
    assert "distilled from another teacher" in error_line(err)
    assert tree(cache) == before and tree(tmp_path / "first") == run_before


def test_cache_of_another_crop_size_exit_3(setup, tmp_path):
    cache = tmp_path / "cache"  # 64³ crops of the small teacher
    distill([setup["prepared"]], setup["small_teacher"], student=STUDENT, teacher_model=None, cache_features=cache,
            output=tmp_path / "small_run", max_steps=1)
    before = tree(cache)
    result, _, err = invoke("distill", setup["prepared"], "--teacher", setup["teacher"], "--teacher-model", "auto",
                            "--student", "fastsam3d-tiny", "--cache-features", cache, "-o", tmp_path / "run")
    assert result.exit_code == 3
    line = error_line(err)
    assert f"feature cache {cache} holds 64³ crops; this run uses 128³ crops" in line
    assert "use another --cache-features folder" in line
    assert tree(cache) == before
    assert not (tmp_path / "run").exists()


def test_full_disk_while_caching_exit_3_nothing_left(setup, tmp_path, monkeypatch):
    def full(path, offset, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(feature_cache.FeatureCacheWriter, "_write_record", staticmethod(full))
    result, _, err = invoke("distill", setup["prepared"], "--teacher", setup["teacher"], "--teacher-model", "auto",
                            "--student", "fastsam3d-tiny", "-o", tmp_path / "run")
    assert result.exit_code == 3
    assert "disk full while writing the teacher feature cache: nothing was kept" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_full_disk_after_some_samples_keeps_a_resumable_cache(setup, tmp_path, monkeypatch):
    original = feature_cache.FeatureCacheWriter._write_record
    calls = {"n": 0}

    def full_after_first_sample(path, offset, data):
        calls["n"] += 1
        if calls["n"] > 8:  # crop + 6 blocks + neck of sample 0
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, offset, data)

    monkeypatch.setattr(feature_cache.FeatureCacheWriter, "_write_record", staticmethod(full_after_first_sample))
    args = ["distill", setup["prepared"], "--teacher", setup["teacher"], "--teacher-model", "auto", "--student",
            "fastsam3d-tiny", "-o", tmp_path / "run", "--max-steps", "1", "--json"]
    result, _, err = invoke(*args)
    assert result.exit_code == 3
    line = error_line(err)
    assert "disk full while writing the teacher feature cache: 1/2 samples are kept" in line
    assert "rerun the same command (the cache resumes)" in line
    assert not (tmp_path / "run" / "last.pth").exists()
    monkeypatch.undo()
    result, out, err = invoke(*args)
    assert result.exit_code == 0, err
    assert json.loads(out)["cache"]["computed_now"] == 1


@pytest.mark.parametrize("extra, fragment", [
    (["--student", "sam-med3d"], "--student 'sam-med3d' is not a student model"),
    (["--student", "fastsam3d-tiny", "--epochs-per-stage", "0"], "--epochs-per-stage must be at least 1"),
    (["--student", "fastsam3d-tiny", "--cache-dtype", "int8"], "--cache-dtype 'int8' is not supported"),
    (["--student", "fastsam3d-tiny", "--lr", "-1"], "--lr must be positive"),
])
def test_bad_options_exit_2(setup, tmp_path, extra, fragment):
    result, _, err = invoke("distill", setup["prepared"], "--teacher", setup["teacher"], "-o", tmp_path / "run", *extra)
    assert result.exit_code == 2
    assert fragment in error_line(err)
    assert not (tmp_path / "run").exists()


def test_run_folder_rules_exit_3(setup, tmp_path):
    base = ["distill", setup["prepared"], "--teacher", setup["teacher"], "--teacher-model", "auto", "--student",
            "fastsam3d-tiny"]
    result, _, err = invoke(*base, "-o", tmp_path / "run", "--resume")
    assert result.exit_code == 3 and "holds no last.pth" in error_line(err)
    used = tmp_path / "used"
    used.mkdir()
    (used / "last.pth").write_bytes(b"x")
    result, _, err = invoke(*base, "-o", used)
    assert result.exit_code == 3 and "already holds a training run" in error_line(err)
    result, _, err = invoke("distill", tmp_path / "missing", "--teacher", setup["teacher"], "--student",
                            "fastsam3d-tiny", "-o", tmp_path / "run")
    assert result.exit_code == 3 and "does not exist" in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]


def test_empty_labels_are_skipped_with_a_warning_and_only_empty_is_exit_3(setup, tmp_path):
    from train_phantoms import add_empty_label

    prepared = make_prepared(tmp_path / "prepared", cases=("p0",))
    add_empty_label(prepared)
    base = ["distill", prepared, "--teacher", setup["teacher"], "--teacher-model", "auto",
            "--student", "fastsam3d-tiny", "--epochs-per-stage", "1", "--max-steps", "1"]
    result, out, err = invoke(*base, "-o", tmp_path / "run", "--json")
    assert result.exit_code == 0, err
    summary = json.loads(out)
    assert summary["samples"] == 2 and summary["cache"]["computed_now"] == 2
    assert any(w.startswith("CT_Dataset990_Phantom/p0/void: the label is empty") for w in summary["warnings"])

    only_empty = tmp_path / "only_empty"
    add_empty_label(only_empty, case="p0")
    before = tree(tmp_path)
    result, out, err = invoke("distill", only_empty, *base[2:], "-o", tmp_path / "run2")
    assert result.exit_code == 3
    assert "every prepared label is empty (1 sample(s): CT_Dataset990_Phantom/p0/void): nothing to distil on" \
        in error_line(err)
    assert tree(tmp_path) == before and not (tmp_path / "run2").exists()
