"""Issue 15 item 17: the right error wins (usage first), and messages that name what to do."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from fastsam3d_cli.device import ATTENTION_BACKENDS, check_attention_name, check_device_spec
from fastsam3d_cli.errors import UsageError, WeightsError
from infer_phantoms import CLI_ENV, make_image, make_tiny_checkpoint, write, write_clicks


@pytest.fixture()
def case(tmp_path) -> Path:
    write(make_image(np.full((20, 20, 12), 40, np.int16)), tmp_path / "v.nii.gz")
    write_clicks(tmp_path / "c.json", "ijk", [{"name": "a", "label": 1, "points": [[10, 10, 6]], "point_labels": [1]}])
    (tmp_path / "v_mask.nii.gz").write_bytes(b"existing output")  # an output that is there already
    return tmp_path


def _run(*args: str):
    result = CliRunner().invoke(app, list(args), env=CLI_ENV)
    lines = result.stderr.strip().splitlines()
    return result.exit_code, lines


@pytest.mark.parametrize("option, fragment", [
    (["--attention", "fast"], "unknown attention backend 'fast'"),
    (["--dtype", "float8"], "unknown --dtype 'float8'"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--model", "fastsam4d"], "unknown model 'fastsam4d'"),
])
def test_infer_usage_errors_win_over_an_existing_output_and_the_model_load(case, option, fragment):
    before = sorted(os.listdir(case))
    code, lines = _run("infer", str(case / "v.nii.gz"), "-c", str(case / "c.json"),
                       "--checkpoint", str(case / "missing.pth"), *option)
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert sorted(os.listdir(case)) == before and (case / "v_mask.nii.gz").read_bytes() == b"existing output"


def test_validate_usage_errors_come_before_data_and_output_checks(tmp_path):
    (tmp_path / "dice.csv").write_text("old")
    for option, fragment in ((["--attention", "fast"], "unknown attention backend 'fast'"),
                             (["--device", "gpu"], "unknown device 'gpu'"),
                             (["--model", "fastsam4d"], "unknown model 'fastsam4d'")):
        code, lines = _run("validate", str(tmp_path / "no_data"), "--checkpoint", str(tmp_path / "missing.pth"),
                           "--csv", str(tmp_path / "dice.csv"), *option)
        assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert (tmp_path / "dice.csv").read_text() == "old"


def test_early_checks_match_what_the_model_accepts():
    from fastsam3d_cli.model.attention import BACKENDS

    assert ATTENTION_BACKENDS == BACKENDS
    for name in BACKENDS:
        check_attention_name(name)
    for spec in ("auto", "cpu", "cuda", "cuda:1", " CPU "):
        check_device_spec(spec)
    with pytest.raises(UsageError):
        check_device_spec("cuda:x")


def test_a_distill_last_pth_given_to_infer_says_use_student_pth(tmp_path):
    from fastsam3d_cli.weights.loading import load_inference_model

    student = make_tiny_checkpoint(tmp_path / "tiny.pth")
    state = torch.load(student, weights_only=True)
    weights = state.get("model_state_dict", state)
    weights = {**weights, "projections.1.weight": torch.zeros(8, 4), "projections.1.bias": torch.zeros(8)}
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "fastsam3d-training", "task": "distill", "epoch": 1, "model_state_dict": weights,
                "optimizer_state_dict": {}}, run / "last.pth")
    with pytest.raises(WeightsError) as info:
        load_inference_model(checkpoint=run / "last.pth", device="cpu")
    message = info.value.one_line()
    assert "is a `fastsam3d distill` training checkpoint" in message
    assert f"use the run's student.pth ({run / 'student.pth'})" in message


def test_weights_messages_name_the_cache_folder(tmp_path, monkeypatch):
    from fastsam3d_cli.weights import cache

    monkeypatch.setenv("FASTSAM3D_HOME", str(tmp_path / "home"))
    with pytest.raises(WeightsError) as info:
        cache.download("fastsam3d", offline=True)
    message = info.value.one_line()
    assert " here " not in message and str(tmp_path / "home" / "weights") in message
    assert "copy FastSAM3D.pth to this machine and run `fastsam3d weights import fastsam3d FILE`" in message
    with pytest.raises(WeightsError) as info:
        cache.resolve_weights("fastsam3d", offline=True)
    assert str(tmp_path / "home" / "weights") in info.value.one_line()


@pytest.mark.parametrize("command", [
    ["train", "NODATA", "-m", "fastsam3d-tiny"],
    ["distill", "NODATA", "--teacher", "NOFILE", "-s", "fastsam3d-tiny"],
])
def test_train_and_distill_report_an_unknown_attention_before_the_data(tmp_path, command):
    args = [a.replace("NODATA", str(tmp_path / "no_data")).replace("NOFILE", str(tmp_path / "t.pth")) for a in command]
    code, lines = _run(*args, "--attention", "fast", "-o", str(tmp_path / "run"))
    assert code == 2 and len(lines) == 1 and "unknown attention backend 'fast'" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == []
