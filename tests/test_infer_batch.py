"""`fastsam3d infer --batch MANIFEST`: the model loaded once, a per-volume table / JSON, a bad manifest refused
before anything runs (one line, exit 2/3, nothing written), a line failing at run time reported while the others
still run, Ctrl-C keeping only finished volumes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from fastsam3d_cli.interactive import infer as infer_module
from fastsam3d_cli.weights.loading import LoadedModel
from infer_phantoms import CLI_ENV, SphereModel, make_tiny_checkpoint, phantom, write

runner = CliRunner()
ORGAN = {"name": "organ", "label": 1, "points": [[24, 20, 16]], "point_labels": [1]}


@pytest.fixture()
def case(tmp_path) -> Path:
    """Three volumes (a, b, c) with a click file each, and a manifest over them (relative paths)."""
    for name, size in (("a", (48, 40, 32)), ("b", (40, 40, 30)), ("c", (48, 44, 32))):
        image, _ = phantom(shape=size)
        write(image, tmp_path / f"{name}.nii.gz")
        (tmp_path / f"{name}.json").write_text(json.dumps({"space": "ijk", "objects": [ORGAN]}))
    (tmp_path / "m.csv").write_text("volume,clicks,output\na.nii.gz,a.json,\nb.nii.gz,b.json,out/b_seg.nii.gz\n"
                                    "c.nii.gz,c.json,\n")
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.fixture()
def loads(monkeypatch) -> list[str]:
    """Replace the model load with a SphereModel (exact, fast); records every load."""
    calls: list[str] = []

    def fake_load(model=None, checkpoint=None, device="auto", *args, **kwargs):
        calls.append(str(checkpoint))
        return LoadedModel(SphereModel(radius=6.0), "fastsam3d-tiny", Path("fake.pth"), "0" * 64, None,
                           torch.device("cpu"), "sdpa", 1.0)

    # Both names: `infer` binds the loader when it is imported, and must not keep the fake after this test.
    monkeypatch.setattr(infer_module, "load_inference_model", fake_load)
    monkeypatch.setattr("fastsam3d_cli.weights.loading.load_inference_model", fake_load)
    return calls


def _run(*args: str):
    return runner.invoke(app, ["infer", *args], env=CLI_ENV)


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _one_error_line(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("fastsam3d infer:")]
    assert len(lines) == 1 and lines[0].startswith("fastsam3d: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_every_volume_is_segmented_with_one_model_load(case, loads):
    result = _run("--batch", str(case / "m.csv"), "--max-crops", "1")
    assert result.exit_code == 0, result.stderr
    assert len(loads) == 1
    for mask in ("a_mask.nii.gz", "a_mask.json", "out/b_seg.nii.gz", "out/b_seg.json", "c_mask.nii.gz", "c_mask.json"):
        assert (case / mask).is_file(), mask
    table = result.stdout
    assert "3 of 3 volume(s) segmented, 0 failed" in table
    for line, name in ((2, "a.nii.gz"), (3, "b.nii.gz"), (4, "c.nii.gz")):
        row = next(r for r in table.splitlines() if f" {name} " in r)
        assert row.strip("│ ").startswith(str(line)) and " ok " in row and "organ" in row
    sidecar = json.loads((case / "out" / "b_seg.json").read_text())
    assert sidecar["input"]["path"] == str((case / "b.nii.gz").absolute())


def test_json_reports_each_line(case, loads):
    result = _run("--batch", str(case / "m.csv"), "--max-crops", "1", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["line"] for r in report["rows"]] == [2, 3, 4]
    assert [r["status"] for r in report["rows"]] == ["ok"] * 3 and report["ok"] == 3 and report["failed"] == 0
    assert report["rows"][1]["output"] == str(case / "out" / "b_seg.nii.gz")
    first = report["rows"][0]
    assert first["objects"][0]["name"] == "organ" and first["objects"][0]["voxels"] > 0
    assert first["sidecar"] == str(case / "a_mask.json") and first["timings_ms"]["encode"] >= 0
    assert report["exit_code"] == 0 and report["model"]["preset"] == "fastsam3d-tiny"


def _bad_manifest(case: Path, kind: str) -> tuple[Path, str]:
    """A manifest with one problem, and a fragment its error line must contain."""
    m = case / "bad.csv"
    body = {
        "empty": ("\n\n", "is empty"),
        "header only": ("volume,clicks\n", "lists no volumes"),
        "unknown column": ("volume,clicks,ouput\na.nii.gz,a.json,x.nii.gz\n", "line 1: unknown column(s) 'ouput'"),
        "no clicks column": ("volume\na.nii.gz\n", "line 1: no 'clicks' column"),
        "short line": ("volume,clicks\na.nii.gz,a.json\n\nb.nii.gz\n", "line 4: 1 field(s), the header has 2"),
        "empty cell": ("volume,clicks\na.nii.gz,\n", "line 2: the clicks is empty"),
        "missing volume": ("volume,clicks\na.nii.gz,a.json\nnope.nii.gz,b.json\n", "line 3: volume"),
        "bad click file": ("volume,clicks\na.nii.gz,a.json\nb.nii.gz,broken.json\n", "line 3:"),
        "same output": ("volume,clicks,output\na.nii.gz,a.json,x.nii.gz\nb.nii.gz,b.json,x.nii.gz\n",
                        "line 3: writes"),
        "output is an input": ("volume,clicks,output\na.nii.gz,a.json,c.nii.gz\nc.nii.gz,c.json,\n",
                               "an input of line 3"),
        "existing output": ("volume,clicks\na.nii.gz,a.json\nb.nii.gz,b.json\n", "line 3:"),
    }[kind]
    m.write_text(body[0])
    (case / "broken.json").write_text("{not json")
    if kind == "existing output":
        (case / "b_mask.nii.gz").write_bytes(b"old")
    return m, body[1]


@pytest.mark.parametrize("kind", ["empty", "header only", "unknown column", "no clicks column", "short line",
                                  "empty cell", "missing volume", "bad click file", "same output",
                                  "output is an input", "existing output"])
def test_a_bad_manifest_is_refused_before_anything_runs(kind, case, loads):
    manifest, fragment = _bad_manifest(case, kind)
    before = _listing(case)
    overwrite = ["--overwrite"] if kind == "output is an input" else []  # never allowed, even so
    line = _one_error_line(_run("--batch", str(manifest), "--max-crops", "1", *overwrite), 3, fragment)
    assert f"manifest {manifest}" in line
    assert loads == [] and _listing(case) == before


def test_a_missing_manifest_and_a_folder(case, loads):
    _one_error_line(_run("--batch", str(case / "nope.csv")), 3, "does not exist")
    _one_error_line(_run("--batch", str(case / "out")), 3, "is a folder")
    assert loads == []


@pytest.mark.parametrize("extra, fragment", [
    (["VOLUME"], "VOLUME cannot be combined with --batch"),
    (["-c", "a.json"], "--clicks cannot be combined with --batch"),
    (["-o", "x.nii.gz", "--preview", "p.png"], "--output and --preview cannot be combined with --batch"),
])
def test_single_volume_options_with_batch_are_usage_errors(extra, fragment, case, loads):
    args = [str(case / "a.nii.gz") if a == "VOLUME" else a for a in extra]
    before = _listing(case)
    _one_error_line(_run("--batch", str(case / "m.csv"), *args), 2, fragment)
    assert loads == [] and _listing(case) == before


def test_without_batch_volume_and_clicks_are_still_required(case, loads):
    _one_error_line(_run(), 2, "Missing argument 'VOLUME' — see 'fastsam3d infer --help'")
    _one_error_line(_run(str(case / "a.nii.gz")), 2, "Missing option '--clicks' / '-c' — see 'fastsam3d infer --help'")


def test_a_line_failing_at_run_time_is_reported_and_the_others_run(case, loads):
    (case / "b.json").write_text(json.dumps({"space": "ijk", "objects": [
        {"name": "organ", "label": 1, "points": [[24, 20, 90]], "point_labels": [1]}]}))  # outside b (30 slices)
    result = _run("--batch", str(case / "m.csv"), "--max-crops", "1", "--json")
    line = _one_error_line(result, 3, f"manifest line 3 ({case / 'b.nii.gz'})", "outside the volume")
    assert line.count("fastsam3d: error:") == 1
    report = json.loads(result.stdout)
    assert [r["status"] for r in report["rows"]] == ["ok", "failed", "ok"]
    assert report["rows"][1]["exit_code"] == 3 and report["exit_code"] == 3 and report["failed"] == 1
    assert (case / "a_mask.nii.gz").is_file() and (case / "c_mask.nii.gz").is_file()
    assert list((case / "out").iterdir()) == []  # the failed line wrote nothing


@pytest.mark.parametrize("stop", ["ctrl-c", "interrupted error"])
def test_ctrl_c_keeps_finished_volumes_and_nothing_partial(stop, case, loads, monkeypatch):
    import fastsam3d_cli.interactive.infer as infer_module
    from fastsam3d_cli.errors import Interrupted

    real = infer_module.compose_labelmap
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt if stop == "ctrl-c" else Interrupted("interrupted while writing")
        return real(*args, **kwargs)

    monkeypatch.setattr(infer_module, "compose_labelmap", interrupt_second)
    result = _run("--batch", str(case / "m.csv"), "--max-crops", "1")
    _one_error_line(result, 130, "interrupted at manifest line 3; 1 finished volume(s) stay written")
    assert (case / "a_mask.nii.gz").is_file() and (case / "a_mask.json").is_file()
    assert list((case / "out").iterdir()) == [] and not (case / "c_mask.nii.gz").exists()


def test_the_real_tiny_model_end_to_end(case, tmp_path_factory):
    """No fake: a fastsam3d-tiny checkpoint, loaded once, two volumes written with their sidecars."""
    tiny = make_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pth")
    (case / "two.csv").write_text("volume,clicks\na.nii.gz,a.json\nc.nii.gz,c.json\n")
    result = _run("--batch", str(case / "two.csv"), "--checkpoint", str(tiny), "--max-crops", "1", "--device",
                  "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["checkpoint"] == str(tiny.absolute()) and report["ok"] == 2
    for name in ("a", "c"):
        sidecar = json.loads((case / f"{name}_mask.json").read_text())
        assert sidecar["model"]["checkpoint_sha256"] == report["model"]["checkpoint_sha256"]
