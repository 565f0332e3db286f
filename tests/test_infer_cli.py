"""`fastsam3d infer` on the command line: outputs, --json, and for every bad input one clear line on stderr, the
documented exit code, and nothing written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from infer_phantoms import CLI_ENV, make_tiny_checkpoint, phantom, voxel_centres_lps, write

runner = CliRunner()
GOOD_OBJECT = {"name": "organ", "label": 1, "points": [[24, 20, 16]], "point_labels": [1]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pth")


@pytest.fixture()
def case(tmp_path) -> Path:
    """A folder with v.nii.gz (48×40×32, 2×2×3 mm) and clicks.json (one object, ijk)."""
    image, _ = phantom(spacing=(2.0, 2.0, 3.0))
    write(image, tmp_path / "v.nii.gz")
    (tmp_path / "clicks.json").write_text(json.dumps({"space": "ijk", "objects": [GOOD_OBJECT]}))
    return tmp_path


def _run(*args: str, env: dict | None = None):
    return runner.invoke(app, ["infer", *args], env={**CLI_ENV, **(env or {})})


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fastsam3d: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


def test_writes_labelmap_sidecar_and_prints_a_table(case, tiny):
    result = _run(str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"), "--checkpoint", str(tiny),
                  "--preview", str(case / "p.png"), "--probabilities", str(case / "probs"))
    assert result.exit_code == 0, result.stderr
    assert set(_listing(case)) == {"v.nii.gz", "clicks.json", "v_mask.nii.gz", "v_mask.json", "p.png",
                                   "probs/v_mask_prob_1_organ.nii.gz"}
    row = next(line for line in result.stdout.splitlines() if line.strip("│ ").startswith("organ"))
    sidecar = json.loads((case / "v_mask.json").read_text())
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells == ["organ", "1", str(sidecar["objects"][0]["voxels"]), f"{sidecar['objects'][0]['volume_ml']:.2f}",
                     "1", str(sidecar["crops_run"])]
    assert "after a" in result.stdout and "wrote " in result.stdout


def test_json_prints_exactly_the_sidecar(case, tiny):
    output = case / "seg.nii.gz"
    result = _run(str(case / "v.nii.gz"), "-c", str(case / "clicks.json"), "-o", str(output), "--checkpoint",
                  str(tiny), "--device", "cpu", "--attention", "exact", "--max-crops", "1", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)  # one object and nothing else on stdout
    assert payload == json.loads((case / "seg.json").read_text())
    assert payload["attention"] == "exact" and payload["pipeline"]["max_crops"] == 1 and payload["crops_run"] == 1
    assert sitk.ReadImage(str(output)).GetSize() == (48, 40, 32)


def test_overwrite_replaces_outputs(case, tiny):
    args = [str(case / "v.nii.gz"), "-c", str(case / "clicks.json"), "--checkpoint", str(tiny)]
    assert _run(*args).exit_code == 0
    (case / "v_mask.nii.gz").write_bytes(b"old")
    again = _run(*args)
    _assert_one_line_error(again, 3, "v_mask.nii.gz already exists", "--overwrite")
    assert (case / "v_mask.nii.gz").read_bytes() == b"old"
    assert _run(*args, "--overwrite").exit_code == 0
    assert sitk.ReadImage(str(case / "v_mask.nii.gz")).GetSize() == (48, 40, 32)


def _clicks(case: Path, data) -> Path:
    path = case / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


BAD_CLICKS = {
    "not json": ('{"space": "ijk", "objects": [', "is not valid JSON"),
    "no space": ({"objects": [GOOD_OBJECT]}, 'has no "space"'),
    "unknown space": ({"space": "voxel", "objects": [GOOD_OBJECT]}, "unknown space 'voxel'"),
    "arity": ({"space": "ijk", "objects": [{**GOOD_OBJECT, "points": [[1, 2]]}]}, "point 1 has 2 coordinates"),
    "non-finite": ('{"space": "ijk", "objects": [{"name": "organ", "label": 1, "points": [[1, NaN, 2]], '
                   '"point_labels": [1]}]}', "non-finite or non-numeric coordinate nan"),
    "labels length": ({"space": "ijk", "objects": [{**GOOD_OBJECT, "point_labels": [1, 1]}]},
                      "has 1 points but 2 point_labels"),
    "labels values": ({"space": "ijk", "objects": [{**GOOD_OBJECT, "point_labels": [-1]}]},
                      "the point label of point 1 (point_labels entry 1, counting from 1) is -1"),
    "duplicate labels": ({"space": "ijk", "objects": [GOOD_OBJECT, {**GOOD_OBJECT, "name": "other"}]},
                         "both use label 1"),
    "no objects": ({"space": "ijk", "objects": []}, "has no objects"),
    "outside": ({"space": "ijk", "objects": [{**GOOD_OBJECT, "points": [[24, 20, 16], [24, 45, 16]],
                                              "point_labels": [1, 0]}]},
                "click 2 of object 'organ' (ijk [24, 45, 16]) is outside the volume: voxel position (i, j, k) = "
                "(24.00, 45.00, 16.00), volume size 48×40×32"),
}


@pytest.mark.parametrize("name", list(BAD_CLICKS))
def test_bad_click_files(name, case, tiny):
    data, fragment = BAD_CLICKS[name]
    clicks = _clicks(case, data)
    before = _listing(case)
    result = _run(str(case / "v.nii.gz"), "-c", str(clicks), "--checkpoint", str(tiny))
    _assert_one_line_error(result, 3, fragment)
    assert _listing(case) == before


def test_world_click_outside_the_volume(case, tiny):
    image = sitk.ReadImage(str(case / "v.nii.gz"))
    far = voxel_centres_lps(image)[24, 20, 16] + [0.0, 0.0, 500.0]
    clicks = _clicks(case, {"space": "lps", "objects": [{**GOOD_OBJECT, "points": [far.tolist()]}]})
    result = _run(str(case / "v.nii.gz"), "-c", str(clicks), "--checkpoint", str(tiny))
    _assert_one_line_error(result, 3, "click 1 of object 'organ' (lps", "is outside the volume", "(24.00, 20.00, 182.67)")


def _bad_volume(case: Path, kind: str) -> Path:
    if kind == "missing":
        return case / "nope.nii.gz"
    if kind == "folder":
        (case / "dir.nii.gz").mkdir()
        return case / "dir.nii.gz"
    if kind == "empty":
        (case / "e.nii.gz").write_bytes(b"")
        return case / "e.nii.gz"
    if kind == "corrupt":
        (case / "c.nii.gz").write_bytes(b"\x1f\x8b this is not a volume" * 20)
        return case / "c.nii.gz"
    if kind == "2d":
        sitk.WriteImage(sitk.Image(20, 20, sitk.sitkInt16), str(case / "flat.nii.gz"))
        return case / "flat.nii.gz"
    if kind == "missing folder":
        return case / "no_such_folder" / "ct.nii.gz"
    if kind == "one slice":
        nib.save(nib.Nifti1Image(np.ones((20, 20, 1), np.int16), np.eye(4)), str(case / "slice.nii.gz"))
        return case / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10, 3), np.int16), np.eye(4)), str(case / "4d.nii.gz"))
    return case / "4d.nii.gz"


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "does not exist"), ("folder", "is a folder"), ("empty", "is an empty file"),
    ("corrupt", "cannot read volume"), ("2d", "is a 2D image"), ("4d", "is 4D with 3 channels — choose one with --channel"),
    ("missing folder", "no_such_folder/ct.nii.gz does not exist"), ("one slice", "is a single slice"),
])
def test_bad_volumes(kind, fragment, case, tiny):
    volume = _bad_volume(case, kind)
    before = _listing(case)
    result = _run(str(volume), "-c", str(case / "clicks.json"), "--checkpoint", str(tiny))
    _assert_one_line_error(result, 3, fragment)
    assert _listing(case) == before


def test_a_channel_of_a_3d_volume_is_refused(case, tiny):
    """--channel picks a channel of a 4D volume; asked of a 3D one it is a mistake, not silently ignored."""
    before = _listing(case)
    result = _run(str(case / "v.nii.gz"), "-c", str(case / "clicks.json"), "--checkpoint", str(tiny), "--channel", "1")
    _assert_one_line_error(result, 3, "--channel 1 does not exist", "it is a 3D volume with one channel",
                           "drop --channel")
    assert _listing(case) == before
    from fastsam3d_cli.imaging.volumes import read_image

    assert read_image(case / "v.nii.gz", 0, strict_channel=True).GetDimension() == 3  # channel 0 is the volume
    assert read_image(case / "v.nii.gz", 1).GetDimension() == 3  # prepare's lenient reading


def test_output_locations(case, tiny, monkeypatch):
    args = [str(case / "v.nii.gz"), "-c", str(case / "clicks.json"), "--checkpoint", str(tiny)]
    before = _listing(case)
    _assert_one_line_error(_run(*args, "-o", str(case / "missing" / "m.nii.gz")), 3,
                           f"output folder {case / 'missing'} does not exist")
    (case / "m.json").write_text("{}")  # the sidecar location is checked too
    _assert_one_line_error(_run(*args, "-o", str(case / "m.nii.gz")), 3, "sidecar", "m.json already exists")
    # Inputs are checked before outputs: a missing click file is named even when the output exists too.
    _assert_one_line_error(_run(str(case / "v.nii.gz"), "-c", str(case / "none.json"), "--checkpoint", str(tiny),
                                "-o", str(case / "m.nii.gz")), 3, "none.json does not exist")
    (case / "m.json").unlink()
    _assert_one_line_error(_run(*args, "-o", str(case / "v.nii.gz"), "--overwrite"), 3,
                           "is the input volume", "inputs are never replaced")
    # The sidecar is <output stem>.json: -o clicks.nii.gz would put it on the click file.
    _assert_one_line_error(_run(*args, "-o", str(case / "clicks.nii.gz"), "--overwrite"), 3,
                           "sidecar (always <output stem>.json)", "clicks.json is the click file",
                           "choose another name with -o")
    _assert_one_line_error(_run(*args, "--preview", str(case / "missing" / "p.png")), 3,
                           "does not exist", "choose another --preview")
    _assert_one_line_error(_run(*args, "-o", str(case / "mask.txt")), 2, "has no image file suffix")
    assert _listing(case) == before

    import fastsam3d_cli.imaging.atomic as atomic

    real_access = os.access
    locked = case / "locked"
    locked.mkdir()
    monkeypatch.setattr(atomic.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    _assert_one_line_error(_run(*args, "-o", str(locked / "m.nii.gz")), 3, f"output folder {locked} is not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_folder(case, tiny):
    locked = case / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    result = _run(str(case / "v.nii.gz"), "-c", str(case / "clicks.json"), "--checkpoint", str(tiny), "-o",
                  str(locked / "m.nii.gz"))
    _assert_one_line_error(result, 3, "is not writable")


def test_weights_and_device_errors(case, tiny, tmp_path_factory, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # also on a machine that has CUDA
    args = [str(case / "v.nii.gz"), "-c", str(case / "clicks.json")]
    before = _listing(case)
    _assert_one_line_error(_run(*args, "--checkpoint", str(case / "none.pth")), 4, "none.pth does not exist")
    corrupt = case / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    before = _listing(case)
    _assert_one_line_error(_run(*args, "--checkpoint", str(corrupt)), 4, "is not a readable PyTorch checkpoint")
    other = _run(*args, "--checkpoint", str(tiny), "--model", "fastsam3d")
    assert other.exit_code == 4 and "does not fit model 'fastsam3d'" in other.stderr.splitlines()[-1]
    assert "use --model fastsam3d-tiny" in other.stderr.splitlines()[-1]  # plus a key/shape diff above it
    home = tmp_path_factory.mktemp("home")
    # An installation without a bundled model (the package ships one; test_bundled.py covers it running).
    monkeypatch.setattr("fastsam3d_cli.weights.bundled.BUNDLED_DIR", home / "no-bundle")
    _assert_one_line_error(_run(*args, env={"FASTSAM3D_HOME": str(home), "FASTSAM3D_OFFLINE": "1"}), 4,
                           "'fastsam3d' are not in the cache", "fastsam3d weights download fastsam3d",
                           "fastsam3d weights import fastsam3d")
    _assert_one_line_error(_run(*args, "--model", "fastsam3d-tiny"), 4, "has no published weights", "--checkpoint")
    _assert_one_line_error(_run(*args, "--checkpoint", str(tiny), "--device", "cuda"), 5,
                           "--device cuda was asked for but CUDA is not available")
    _assert_one_line_error(_run(*args, "--checkpoint", str(tiny), "--model", "sam3"), 2, "unknown model 'sam3'")
    _assert_one_line_error(_run(*args, "--checkpoint", str(tiny), "--attention", "fast"), 2,
                           "unknown attention backend 'fast'")
    assert _listing(case) == before
    bad = _run(*args, "--checkpoint", str(tiny), "--max-crops", "0")
    assert bad.exit_code == 2 and _listing(case) == before


def test_ctrl_c_exits_130_and_leaves_nothing(case, tiny, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fastsam3d_cli.interactive.infer.compose_labelmap", interrupt)
    before = _listing(case)
    result = _run(str(case / "v.nii.gz"), "-c", str(case / "clicks.json"), "--checkpoint", str(tiny),
                  "--preview", str(case / "p.png"))
    _assert_one_line_error(result, 130, "interrupted — nothing partial was left behind")
    assert _listing(case) == before


def test_slicer_markups_file(case, tiny):
    image = sitk.ReadImage(str(case / "v.nii.gz"))
    lps = voxel_centres_lps(image)[24, 20, 16]
    markups = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
        {"label": "F-1", "position": [-lps[0], -lps[1], lps[2]], "positionStatus": "defined"}]}]}
    (case / "organ.mrk.json").write_text(json.dumps(markups))
    result = _run(str(case / "v.nii.gz"), "-c", str(case / "organ.mrk.json"), "--checkpoint", str(tiny), "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["clicks_file"]["format"] == "slicer-markups"
    assert payload["objects"][0]["name"] == "organ"
    assert payload["objects"][0]["clicks"][0]["ijk"] == [24.0, 20.0, 16.0]


def test_help_lists_the_options():
    result = runner.invoke(app, ["infer", "--help"], env=CLI_ENV)
    assert result.exit_code == 0
    for option in ("--clicks", "--output", "--model", "--checkpoint", "--device", "--attention", "--preview",
                   "--probabilities", "--json", "--overwrite", "--max-crops", "--channel"):
        assert option in result.stdout


def test_existing_probability_maps_need_overwrite(case, tiny):
    probs = case / "probs"
    probs.mkdir()
    existing = probs / "v_mask_prob_1_organ.nii.gz"
    existing.write_bytes(b"an earlier result")
    before = _listing(case)
    args = [str(case / "v.nii.gz"), "-c", str(case / "clicks.json"), "--checkpoint", str(tiny), "--probabilities",
            str(probs)]
    _assert_one_line_error(_run(*args), 3, "probability map", "v_mask_prob_1_organ.nii.gz already exists", "--overwrite")
    assert _listing(case) == before and existing.read_bytes() == b"an earlier result"
    assert _run(*args, "--overwrite").exit_code == 0
    assert existing.read_bytes() != b"an earlier result"


def test_outputs_appear_together_or_not_at_all(case, tiny, monkeypatch):
    """A failure (or Ctrl-C) while the finished outputs are renamed into place leaves none of them."""
    import fastsam3d_cli.imaging.atomic as atomic

    real_replace, calls = os.replace, []

    def fail_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_on_second)
    before = _listing(case)
    result = _run(str(case / "v.nii.gz"), "-c", str(case / "clicks.json"), "--checkpoint", str(tiny),
                  "--preview", str(case / "p.png"))
    assert result.exit_code == 130 and len(calls) == 2
    assert _listing(case) == before
