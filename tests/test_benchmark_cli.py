"""`fastsam3d benchmark` on the command line: table, --json, and one line + exit code per bad option."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import pytest
import torch
from typer.testing import CliRunner

from fastsam3d_cli.cli import app

runner = CliRunner()
ENV = {"NO_COLOR": "1", "COLUMNS": "200"}
QUICK = ["-m", "fastsam3d-tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--clicks", "1"]


def _run(*args: str):
    return runner.invoke(app, ["benchmark", *args], env=ENV)


def _one_error_line(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fastsam3d: error: ") and text in lines[0], lines[0]
    assert result.stdout == ""


def test_json_is_one_object_with_everything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads_before = torch.get_num_threads()
    # float32: bfloat16 has no fast CPU kernels here (the end-to-end test below runs it); this is about the JSON
    result = _run(*QUICK, "-m", "fastsam3d", "-a", "sdpa", "-a", "flash", "--dtype", "float32", "--json",
                  "--threads", "1")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["environment"]["torch_threads"] == 1 and payload["environment"]["torch"] == torch.__version__
    assert payload["settings"]["models"] == ["fastsam3d-tiny", "fastsam3d"]
    labels = [(c["label"], c["status"]) for c in payload["configs"]]
    assert labels == [("fastsam3d-tiny/sdpa/float32", "ok"), ("fastsam3d-tiny/flash/float32", "unavailable"),
                      ("fastsam3d/sdpa/float32", "ok"), ("fastsam3d/flash/float32", "unavailable")]
    assert payload["baseline"] == "fastsam3d-tiny/sdpa/float32"
    student = payload["configs"][2]
    assert student["speedup"]["encoder"] == pytest.approx(
        payload["configs"][0]["encoder"]["median_ms"] / student["encoder"]["median_ms"])
    assert student["flops"]["image_encoder"]["gmacs"] == pytest.approx(24.78, rel=1e-3)
    assert torch.get_num_threads() == threads_before  # --threads 1 applied to the run only
    assert list(tmp_path.iterdir()) == []  # the benchmark writes nothing


def test_bfloat16_runs_and_is_named_in_every_label():
    result = _run(*QUICK, "--dtype", "bfloat16", "--json", "--no-flops", "--threads", "1")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [(c["label"], c["status"]) for c in payload["configs"]] == [("fastsam3d-tiny/auto/bfloat16", "ok")]
    assert payload["configs"][0]["encoder"]["median_ms"] > 0


def test_batch_of_two_volumes():
    result = _run(*QUICK, "--batch", "2", "--json", "--no-flops")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["settings"]["batch"] == 2 and payload["configs"][0]["status"] == "ok"
    assert payload["configs"][0]["flops"] is None and "flops" not in payload["conventions"]


def test_table_names_every_configuration_and_the_reason_for_unavailable_ones():
    result = _run(*QUICK, "-a", "auto", "-a", "flash")
    assert result.exit_code == 0, result.output
    assert "fastsam3d-tiny auto→sdpa fp32" in result.stdout
    assert "fastsam3d-tiny/flash/float32 unavailable: the flash attention backend needs" in result.stdout
    assert "times faster than fastsam3d-tiny/auto/float32" in result.stdout
    assert "GMAC" in result.stdout and "7.63 M" in result.stdout  # FLOPs/params table


@pytest.mark.parametrize("args, message", [
    (["-m", "sam-med4d"], "unknown model 'sam-med4d'"),
    (["-a", "fastest"], "unknown attention backend 'fastest'"),
    (["--dtype", "float64"], "unknown dtype 'float64'"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--clicks", "0"], "--clicks must be at least 1"),
    (["--budget", "-5"], "--budget must be at least 0"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--volume", "ct.nii.gz"], "--volume and --clicks-file go together"),
    (["--clicks-file", "clicks.json"], "--volume and --clicks-file go together"),
])
def test_bad_options_exit_2_with_one_line(args, message):
    _one_error_line(_run("-m", "fastsam3d-tiny", *args), 2, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_5():
    _one_error_line(_run(*QUICK, "--device", "cuda"), 5, "CUDA is not available")


def test_only_unavailable_backends_exits_with_their_reason():
    result = _run(*QUICK, "-a", "flash")
    if torch.cuda.is_available():
        pytest.skip("flash may be runnable here")
    _one_error_line(result, 5, "flash attention backend needs")


# ----------------------------------------------------------------------------------- end to end (--volume)
def _phantom_case(folder: Path, clicks_ijk=((20, 22, 9), (5, 5, 5))) -> tuple[Path, Path]:
    """A 40×44×18 volume (2×2×3 mm, off-origin) with a bright ellipsoid, and a click file in ijk."""
    i, j, k = np.meshgrid(np.arange(40), np.arange(44), np.arange(18), indexing="ij")
    inside = ((i - 20) / 8) ** 2 + ((j - 22) / 10) ** 2 + ((k - 9) / 4) ** 2 <= 1
    array_ijk = np.where(inside, 200.0, 20.0) + np.random.default_rng(0).normal(0, 5, inside.shape)
    image = sitk.GetImageFromArray(array_ijk.astype(np.float32).transpose(2, 1, 0).copy())  # sitk wants kji
    image.SetSpacing((2.0, 2.0, 3.0))
    image.SetOrigin((10.0, -5.0, 3.0))
    volume = folder / "ct.nii.gz"
    sitk.WriteImage(image, str(volume))
    clicks = folder / "clicks.json"
    clicks.write_text(json.dumps({"version": 1, "space": "ijk", "objects": [
        {"name": "blob", "label": 3, "points": [list(c) for c in clicks_ijk], "point_labels": [1, 0]}]}))
    return volume, clicks


def test_end_to_end_stages_and_nothing_left_behind(tmp_path):
    volume, clicks = _phantom_case(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    result = _run(*QUICK, "--repeats", "2", "--volume", str(volume), "--clicks-file", str(clicks), "--json")
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["configs"][0]
    stages = config["end_to_end"]
    assert list(stages) == ["read", "preprocess", "encode", "decode", "paste", "write", "total"]
    assert all(stats["n"] == 2 and stats["median_ms"] >= 0 for stats in stages.values())
    assert stages["encode"]["median_ms"] > 0 and stages["total"]["median_ms"] >= stages["encode"]["median_ms"]
    assert config["first_call"]["end_to_end_ms"] > 0
    assert config["end_to_end_crops"] >= 1  # how much work a file → file run did (depends on the masks)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # inputs untouched, no outputs left


def test_end_to_end_and_the_table(tmp_path):
    volume, clicks = _phantom_case(tmp_path)
    result = _run(*QUICK, "--dtype", "float32", "--volume", str(volume), "--clicks-file", str(clicks), "--no-flops")
    assert result.exit_code == 0, result.output
    assert "file → file ms" in result.stdout and "fastsam3d-tiny/auto/float32" in result.stdout


def test_end_to_end_bad_inputs_exit_3_before_timing(tmp_path):
    volume, clicks = _phantom_case(tmp_path, clicks_ijk=((20, 22, 9), (60, 5, 5)))
    _one_error_line(_run(*QUICK, "--volume", str(volume), "--clicks-file", str(clicks)), 3, "outside")
    _one_error_line(_run(*QUICK, "--volume", str(tmp_path / "missing.nii.gz"), "--clicks-file", str(clicks)), 3,
                    "missing.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clicks.json", "ct.nii.gz"]


# ----------------------------------------------------------------------------------- --checkpoint
def _tiny_checkpoint(path: Path, seed: int = 5):
    from fastsam3d_cli.model import build_model
    from fastsam3d_cli.model.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = build_model("fastsam3d-tiny")
    save_checkpoint(path, model.state_dict())
    return model


def test_checkpoint_is_timed_with_its_own_weights(tmp_path, monkeypatch):
    """A distilled/trained student is benchmarked from its file: preset read from it, its weights used."""
    from fastsam3d_cli.benchmark import speed as benchmark
    path = tmp_path / "student.pth"
    saved = _tiny_checkpoint(path)
    seen = []
    timed = benchmark._interaction

    def spy(model, inputs, clock):
        seen.append(model.image_encoder.patch_embed.proj.weight.detach().clone())
        return timed(model, inputs, clock)

    monkeypatch.setattr(benchmark, "_interaction", spy)
    result = _run("--checkpoint", str(path), "--device", "cpu", "--repeats", "1", "--warmup", "0", "--clicks", "1",
                  "-a", "exact", "--json", "--no-flops")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [c["label"] for c in payload["configs"]] == ["student.pth:fastsam3d-tiny/exact/float32"]
    assert payload["configs"][0]["checkpoint"] == str(path) and payload["configs"][0]["status"] == "ok"
    assert payload["settings"]["models"] == [] and payload["settings"]["checkpoints"] == [str(path)]
    assert seen and all(torch.equal(w, saved.image_encoder.patch_embed.proj.weight) for w in seen)


def test_checkpoint_rows_follow_the_presets_in_the_table(tmp_path):
    path = tmp_path / "student.pth"
    _tiny_checkpoint(path)
    result = _run(*QUICK, "-a", "exact", "--checkpoint", str(path), "--no-flops")
    assert result.exit_code == 0, result.output
    assert result.stdout.index("fastsam3d-tiny exact fp32") < result.stdout.index("student.pth (fastsam3d-tiny)")


def test_corrupt_checkpoint_exits_4_before_timing(tmp_path, monkeypatch):
    from fastsam3d_cli.benchmark import speed as benchmark
    path = tmp_path / "student.pth"
    path.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(benchmark, "_interaction", lambda *a: pytest.fail("nothing may be timed"))
    result = _run(*QUICK, "--checkpoint", str(path))
    _one_error_line(result, 4, "student.pth")
    assert path.read_bytes() == b"not a checkpoint"


def test_the_bundled_model_is_timed_on_what_it_runs_per_click_not_an_encoder_it_never_runs():
    """A prior-only model skips encoder and decoder in `infer`: its row has no encoder time and its 'decoder
    step' is the prior step (floor + refine head on the clicks' box) on a phantom crop; no FLOP count of the
    unused encoder. A preset's row beside it is unchanged."""
    result = _run("-m", "bundled", *QUICK, "--clicks", "3", "--json", "--threads", "1")
    assert result.exit_code == 0, result.output
    rows = {row["model"]: row for row in json.loads(result.stdout)["configs"]}
    prior, plain = rows["fastsam3d-tiny-refine"], rows["fastsam3d-tiny"]
    assert prior["step"] == "prior" and prior["encoder"] is None and prior["first_call"]["encoder_ms"] is None
    assert prior["decoder_step"]["median_ms"] > 0 and prior["interactive"]["median_ms"] >= prior["decoder_step"]["median_ms"]
    assert len(prior["prior_box"]) == 3 and all(16 <= side <= 128 for side in prior["prior_box"])
    assert prior["flops"] is None and prior["speedup"]["encoder"] is None
    assert plain["step"] == "decoder" and plain["encoder"]["median_ms"] > 0 and plain["flops"] is not None
    table = _run("-m", "bundled", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--clicks", "2")
    assert table.exit_code == 0, table.output
    assert "— (none)" in table.stdout and "prior step:" in table.stdout
