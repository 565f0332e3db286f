"""`infer --dtype`: reduced-precision inference (bfloat16 is 2–3× faster on AVX512-BF16 CPUs and GPUs)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from fastsam3d_cli.model import build_model
from infer_phantoms import CLI_ENV, make_tiny_checkpoint, phantom, write


def test_model_runs_in_bfloat16_with_float32_inputs():
    """The model core casts inputs to its weights' dtype; bf16 logits stay close to float32 ones."""
    torch.manual_seed(0)
    model = build_model("fastsam3d-tiny", attention="sdpa")
    volume = torch.randn(1, 1, 128, 128, 128)
    point, label = torch.tensor([[[40.0, 50.0, 60.0]]]), torch.tensor([[1]])
    previous = torch.zeros(1, 1, 32, 32, 32)  # float32, as the Predictor feeds it
    with torch.inference_mode():
        reference, _ = model.decode(model.encode(volume), point, label, previous)
        model = model.to(torch.bfloat16)
        assert model.dtype == torch.bfloat16
        low_res, _ = model.decode(model.encode(volume), point, label, previous)
    assert low_res.dtype == torch.bfloat16
    scale = reference.abs().max()
    assert (low_res.float() - reference).abs().max() <= 0.05 * scale


@pytest.fixture()
def case(tmp_path):
    image, _ = phantom(spacing=(2.0, 2.0, 3.0))
    write(image, tmp_path / "v.nii.gz")
    clicks = {"space": "ijk", "objects": [{"name": "organ", "label": 1, "points": [[24, 20, 16]], "point_labels": [1]}]}
    (tmp_path / "clicks.json").write_text(json.dumps(clicks))
    make_tiny_checkpoint(tmp_path / "tiny.pth")
    return tmp_path


def test_infer_bfloat16_writes_the_same_geometry_and_records_the_dtype(case):
    args = ["infer", str(case / "v.nii.gz"), "-c", str(case / "clicks.json"), "--checkpoint", str(case / "tiny.pth"),
            "--max-crops", "1", "--json"]
    fp32 = CliRunner().invoke(app, args + ["-o", str(case / "fp32.nii.gz")], env=CLI_ENV)
    bf16 = CliRunner().invoke(app, args + ["-o", str(case / "bf16.nii.gz"), "--dtype", "bfloat16"], env=CLI_ENV)
    assert fp32.exit_code == 0 and bf16.exit_code == 0, (fp32.stderr, bf16.stderr)
    assert json.loads(fp32.stdout)["dtype"] == "float32" and json.loads(bf16.stdout)["dtype"] == "bfloat16"
    a, b = (sitk.ReadImage(str(case / f"{n}.nii.gz")) for n in ("fp32", "bf16"))
    assert a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    agree = np.mean(sitk.GetArrayFromImage(a) == sitk.GetArrayFromImage(b))
    assert agree > 0.9


def test_unknown_dtype_is_a_usage_error_and_writes_nothing(case):
    before = sorted(p.name for p in case.iterdir())
    result = CliRunner().invoke(app, ["infer", str(case / "v.nii.gz"), "-c", str(case / "clicks.json"),
                                      "--checkpoint", str(case / "tiny.pth"), "--dtype", "float8"], env=CLI_ENV)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fastsam3d: error: unknown --dtype 'float8'")
    assert sorted(p.name for p in case.iterdir()) == before
