"""Issue 15 (hardening): inputs found by trying to break every command. Each test feeds the input and checks the
one-line message, the exit code, and that nothing partial or stale is left."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from infer_phantoms import CLI_ENV, make_tiny_checkpoint, one_line_error, phantom, write

runner = CliRunner()


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pth")


@pytest.fixture()
def case(tmp_path) -> Path:
    image, _ = phantom()
    write(image, tmp_path / "v.nii.gz")
    (tmp_path / "clicks.json").write_text(json.dumps({"space": "ijk", "objects": [
        {"name": "organ", "label": 1, "points": [[24, 20, 16]], "point_labels": [1]}]}))
    return tmp_path


# ------------------------------------------------------------------ 3: header-only output formats
@pytest.mark.parametrize("name, single", [("mask.mhd", "mask.mha"), ("mask.nhdr", "mask.nrrd"),
                                          ("MASK.MHD", "MASK.mha")])
def test_a_header_only_output_format_is_refused_with_its_single_file_form(case, tiny, name, single):
    """The header pointed at a hidden temporary data file; each --overwrite left another orphan."""
    before = _tree(case)
    result = runner.invoke(app, ["infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"),
                                 "--checkpoint", str(tiny), "-o", str(case / name)], env=CLI_ENV)
    one_line_error(result, 2, f"output {case / name} is a header-only format", f"as one file: {single}")
    assert _tree(case) == before


def test_the_single_file_forms_write_one_file_each(case, tiny):
    for name in ("mask.mha", "mask.nrrd"):
        result = runner.invoke(app, ["infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"),
                                     "--checkpoint", str(tiny), "-o", str(case / name), "--overwrite"], env=CLI_ENV)
        assert result.exit_code == 0, result.output
    assert set(_tree(case)) == {"v.nii.gz", "clicks.json", "mask.mha", "mask.nrrd", "mask.json"}


# ------------------------------------------------------------------ 4: prepare forgets what has no source
def test_a_prepare_rerun_drops_what_the_source_no_longer_has_and_says_so(tmp_path):
    import numpy as np

    from fastsam3d_cli.data.prepared import list_prepared_samples
    from prepare_phantoms import CLI_ENV as PREPARE_ENV, make_v2_dataset, phantom_label, write_volume

    raw = make_v2_dataset(tmp_path / "raw", cases=("case_a", "case_b", "case_c"))
    out = tmp_path / "prepared"
    first = runner.invoke(app, ["prepare", str(raw), "-o", str(out), "--min-volume-mm3", "0"], env=PREPARE_ENV)
    assert first.exit_code == 0, first.output
    names = lambda: {(s.case, s.class_name) for s in list_prepared_samples(out)}  # noqa: E731
    assert names() == {(c, k) for c in ("case_a", "case_b", "case_c") for k in ("liver", "left_kidney", "tiny")}
    # The source changes: case_b deleted, class "tiny" removed from dataset.json, left kidney emptied in case_c.
    for file in (raw / "imagesTr" / "case_b_0000.nii.gz", raw / "labelsTr" / "case_b.nii.gz"):
        file.unlink()
    meta = json.loads((raw / "dataset.json").read_text())
    del meta["labels"]["tiny"]
    meta["numTraining"] = 2
    (raw / "dataset.json").write_text(json.dumps(meta))
    without_tiny = np.where(phantom_label() == 3, 0, phantom_label()).astype(np.uint8)
    write_volume(raw / "labelsTr" / "case_a.nii.gz", without_tiny)
    write_volume(raw / "labelsTr" / "case_c.nii.gz", np.where(without_tiny == 2, 0, without_tiny).astype(np.uint8))
    again = runner.invoke(app, ["prepare", str(raw), "-o", str(out), "--min-volume-mm3", "0"], env=PREPARE_ENV)
    assert again.exit_code == 0, again.output
    assert names() == {("case_a", "liver"), ("case_a", "left_kidney"), ("case_c", "liver")}
    warnings = [line for line in again.stderr.splitlines() if line.startswith("warning: ")]
    assert ("warning: Dataset900_Phantom: case case_b is gone from the source; dropped its 4 manifest entries and "
            "their prepared files") in warnings
    assert ("warning: Dataset900_Phantom: class tiny is gone from the source; dropped its 2 manifest entries and "
            "their prepared files") in warnings
    assert any(w.startswith("warning: Dataset900_Phantom/case_c/left_kidney: now ") and "files were removed" in w
               for w in warnings)
    # Nothing stale is left on disk: only files the manifest lists (and the manifest).
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {e[f] for e in manifest["entries"] for f in ("image_path", "label_path", "ignore_path") if e[f]}
    assert set(_tree(out)) == listed | {"manifest.json"}
    assert not (out / "tiny").exists()
    assert {(e["case"], e["class"], e["status"]) for e in manifest["entries"]} == {
        ("case_a", "liver", "written"), ("case_a", "left_kidney", "written"), ("case_c", "liver", "written"),
        ("case_c", "left_kidney", "skipped"), ("case_a", "absent_organ", "skipped"),
        ("case_c", "absent_organ", "skipped")}


# ------------------------------------------------------------------ 9, 10: prepare output folder and spacing
def test_prepare_into_a_folder_that_cannot_be_written_is_exit_3(tmp_path, monkeypatch):
    import errno
    import os

    from fastsam3d_cli.data import prepare as prepare_module
    from prepare_phantoms import CLI_ENV as PREPARE_ENV, make_v2_dataset

    raw = make_v2_dataset(tmp_path / "raw")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: let the check see what a user would
        real_access = os.access
        monkeypatch.setattr(prepare_module.os, "access",
                            lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    result = runner.invoke(app, ["prepare", str(raw), "-o", str(locked / "out")], env=PREPARE_ENV)
    one_line_error(result, 3, f"output folder {locked / 'out'} cannot be created: {locked} is not writable",
                    "choose a writable location with -o")
    assert _tree(locked) == {} and not (locked / "out").exists()
    monkeypatch.undo()
    locked.chmod(0o755)

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(prepare_module.Path, "mkdir", read_only)  # a read-only mount os.access does not see
    result = runner.invoke(app, ["prepare", str(raw), "-o", str(locked / "out")], env=PREPARE_ENV)
    one_line_error(result, 3, "cannot be created: Read-only file system")


def test_prepare_with_a_spacing_that_would_make_a_huge_grid_is_a_usage_error(tmp_path):
    from prepare_phantoms import CLI_ENV as PREPARE_ENV, make_v2_dataset

    raw = make_v2_dataset(tmp_path / "raw")  # 20×16×12 voxels of 3 mm
    out = tmp_path / "prepared"
    result = runner.invoke(app, ["prepare", str(raw), "-o", str(out), "--spacing", "0.01"], env=PREPARE_ENV)
    one_line_error(result, 2, "--spacing 0.01 would resample Dataset900_Phantom case case_a onto a 6000×4800×3600 "
                               "grid (104 billion voxels", "give a coarser --spacing")
    assert not out.exists()
    fine = runner.invoke(app, ["prepare", str(raw), "-o", str(out), "--spacing", "0.5"], env=PREPARE_ENV)
    assert fine.exit_code == 0, fine.output  # 120×96×72: allowed


# ------------------------------------------------------------------ 11: a click file nested thousands deep
@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"space": "ijk", "objects": [{"label": 1, "points": ' + "[" * 50_000 + "]" * 50_000
                                  + ', "point_labels": [1]}]}'])
def test_a_deeply_nested_click_file_is_invalid_json_not_an_internal_error(case, tiny, text):
    (case / "clicks.json").write_text(text)
    before = _tree(case)
    result = runner.invoke(app, ["infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"),
                                 "--checkpoint", str(tiny)], env=CLI_ENV)
    one_line_error(result, 3, f"click file {case / 'clicks.json'} is not valid JSON", "nested too deeply")
    assert _tree(case) == before


# ------------------------------------------------------------------ 12: Dice 0.0 is not nan in the train table
def test_the_train_table_shows_a_dice_of_zero_as_zero(capsys):
    from types import SimpleNamespace

    from fastsam3d_cli.cli.train_cmd import _render, _step_text

    records = [{"epoch": 1, "step": 3, "loss": 3.25, "dice": 0.0, "lr": [1e-4], "seconds": 2.0, "best": True},
               {"epoch": 2, "step": 6, "loss": 2.5, "lr": [1e-4], "seconds": 2.0}]
    outcome = SimpleNamespace(epoch_records=records, stop_reason="completed", epochs_completed=2, global_step=6,
                              wall_s=4.0, last_checkpoint=Path("run/last.pth"), best_checkpoint=None, best_metric="dice",
                              best_value=0.0)
    _render(SimpleNamespace(outcome=outcome, preset="fastsam3d-tiny", run_dir=Path("run"), samples=2, world_size=1,
                            device="cpu"))
    rows = [line for line in capsys.readouterr().out.splitlines() if "3.2500" in line or "2.5000" in line]
    assert "0.0000" in rows[0] and "nan" not in rows[0]
    assert "nan" not in rows[1] and re.search(r"│\s+-\s+│", rows[1])  # no Dice recorded: a dash
    assert _step_text({"epoch": 0.5, "loss": 1.0, "dice": 0.0}) == "epoch 0.50 loss 1.0000 dice 0.0000"


# ------------------------------------------------------------------ 13: import runs loading's strict key check
def test_weights_import_refuses_a_checkpoint_that_misses_a_key(tmp_path, monkeypatch):
    """Recorded as verified before, then refused by every load with a fix that could not apply."""
    import dataclasses

    import torch

    from fastsam3d_cli.errors import WeightsError
    from fastsam3d_cli.model import build_model
    from fastsam3d_cli.weights import cache as weights

    spec = dataclasses.replace(weights.get_spec("fastsam3d"), preset="fastsam3d-tiny")  # a small model, same rules
    monkeypatch.setattr(weights, "registry", lambda: {"fastsam3d": spec})
    monkeypatch.setenv(weights.HOME_ENV, str(tmp_path / "home"))
    state = build_model("fastsam3d-tiny").state_dict()
    whole, broken = tmp_path / "whole.pth", tmp_path / "broken.pth"
    torch.save({"model_state_dict": state}, whole)
    del state["mask_decoder.iou_token.weight"]
    torch.save({"model_state_dict": state}, broken)
    with pytest.raises(WeightsError, match=rf"{broken} does not fit model 'fastsam3d-tiny'") as error:
        weights.import_file("fastsam3d", broken)
    assert any("missing from the checkpoint: 1 keys" in line for line in error.value.details)
    assert list((tmp_path / "home").rglob("*.pth")) == []  # nothing recorded, nothing left half-written
    entry = weights.import_file("fastsam3d", whole)  # the whole file is still taken
    assert entry.verified and entry.path.is_file()


# ------------------------------------------------------------------ 15: a 4D file where channels are files
@pytest.mark.parametrize("channel", [[], ["--channel", "0"]])
def test_a_4d_image_in_a_one_channel_per_file_dataset_gets_a_fix_that_works(tmp_path, channel):
    import nibabel as nib
    import numpy as np

    from prepare_phantoms import CLI_ENV as PREPARE_ENV, make_v2_dataset

    raw = make_v2_dataset(tmp_path / "raw")
    nib.save(nib.Nifti1Image(np.zeros((20, 16, 12, 2), np.int16), np.diag([3.0, 3.0, 3.0, 1.0])),
             str(raw / "imagesTr" / "case_a_0000.nii.gz"))
    result = runner.invoke(app, ["prepare", str(raw), "-o", str(tmp_path / "out"), *channel], env=PREPARE_ENV)
    line = one_line_error(result, 3, "is 4D with 2 channels, but this dataset keeps one 3D channel per file",
                           "split the 4D file into one 3D file per channel")
    assert "--channel" not in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 16: an interrupted distill says what it kept
def test_an_interrupted_distill_says_its_cache_is_kept_and_resume_continues_it(tmp_path, monkeypatch, one_thread):
    from distill_builders import CLI_ENV as DISTILL_ENV, TINY_COMPATIBLE_TEACHER, save_teacher
    from fastsam3d_cli.training import distill as distill_module
    from train_phantoms import make_prepared

    prepared = make_prepared(tmp_path / "prepared", cases=("p0",))  # 2 samples
    teacher = save_teacher(tmp_path / "teacher.pth", TINY_COMPATIBLE_TEACHER)
    real = distill_module.build_teacher_cache

    def ctrl_c_after_one_sample(samples, teacher_net, identity, cache_dir, device, on_cache):
        def progress(done, total):
            if done >= 1:
                raise KeyboardInterrupt
        return real(samples, teacher_net, identity, cache_dir, device, progress)

    run_dir = tmp_path / "run"
    command = ["distill", str(prepared), "--teacher", str(teacher), "--teacher-model", "auto", "--student",
               "fastsam3d-tiny", "-o", str(run_dir), "--epochs-per-stage", "1", "--max-steps", "1"]
    monkeypatch.setattr(distill_module, "build_teacher_cache", ctrl_c_after_one_sample)
    result = runner.invoke(app, command, env=DISTILL_ENV)
    assert result.exit_code == 130, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastsam3d: error: ")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1]  # progress lines, then one error
    line = errors[0]
    assert ("interrupted while caching teacher features: the features cached so far are kept in "
            f"{run_dir / distill_module.CACHE_SUBDIR}") in line and "run the same command again" in line
    assert "nothing partial" not in line and not (run_dir / "last.pth").exists()
    monkeypatch.setattr(distill_module, "build_teacher_cache", real)
    resumed = runner.invoke(app, [*command, "--resume", "--json"], env=DISTILL_ENV)
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert summary["cache"]["computed_now"] == 1 and summary["global_step"] == 1  # the cache continued
    assert any("stopped while caching teacher features" in w for w in summary["warnings"])


# ------------------------------------------------------------------ 14: third-party noise on stderr
def test_a_cut_metaimage_is_one_clear_error_and_nothing_native_on_stderr(tmp_path, capfd):
    import SimpleITK as sitk

    from fastsam3d_cli.errors import BadInputError
    from fastsam3d_cli.imaging.volumes import read_image

    image, _ = phantom()
    path = tmp_path / "v.mha"
    sitk.WriteImage(image, str(path), useCompression=False)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    capfd.readouterr()
    with pytest.raises(BadInputError) as error:
        read_image(path)
    assert str(error.value).startswith(f"volume {path} is truncated or corrupt: data not read completely (")
    assert "No such file or directory" not in str(error.value)  # MetaImage's leftover errno was reported as the cause
    assert capfd.readouterr().err == ""  # MetaImage's own two lines are not printed


def test_a_preview_of_non_latin_object_names_warns_nothing(tmp_path):
    import warnings

    import numpy as np

    from fastsam3d_cli.imaging.volumes import array_ijk
    from fastsam3d_cli.interactive.preview import write_preview

    image, _ = phantom()
    labels = (array_ijk(image) > np.percentile(array_ijk(image), 90)).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (a missing glyph) fails the test
        write_preview(tmp_path / "p.png", image, labels,
                      [{"name": "肝臓 печень ήπαρ", "label": 1, "clicks_ijk": [[24, 20, 16]], "includes": [True]}])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _RunsCode:
    def __reduce__(self):
        import os
        return (os.getcwd, ())


@pytest.mark.parametrize("legacy", [True, False])
def test_an_unsafe_pickle_is_refused_as_unsafe_not_called_corrupt(tmp_path, capfd, legacy):
    import warnings

    import torch

    from fastsam3d_cli.errors import WeightsError
    from fastsam3d_cli.model.checkpoint import load_payload

    path = tmp_path / "unsafe.pth"
    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "extra": _RunsCode()}, path,
               _use_new_zipfile_serialization=not legacy)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsError) as error:
            load_payload(path)
    assert "refusing to load" in str(error.value) and "code that would run on load" in str(error.value)
    assert "corrupt" not in str(error.value)
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------ 1: the issue's own case, end to end
def test_train_resume_with_fewer_classes_ends_the_interrupted_epoch_instead_of_hanging(tmp_path):
    """A 2-sample run stopped after step 1 of 2, resumed with `--classes ball` (1 sample, 1 step per epoch): the
    saved position lay past the new epoch's end and the run spun forever at 100 % CPU."""
    import signal

    from train_phantoms import CLI_ENV as TRAIN_ENV, make_prepared

    prepared = make_prepared(tmp_path / "prepared", cases=("p0",))  # ball and egg
    run = tmp_path / "run"
    common = ["train", str(prepared), "--model", "fastsam3d-tiny", "-o", str(run), "--batch-size", "1",
              "--iterations", "1", "--device", "cpu", "--min-foreground", "1"]
    first = runner.invoke(app, [*common, "--epochs", "2", "--max-steps", "1"], env=TRAIN_ENV)
    assert first.exit_code == 0, first.output

    def hung(signum, frame):
        raise AssertionError("train --resume is still running after 300 s: it hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(300)
    try:
        resumed = runner.invoke(app, [*common, "--epochs", "2", "--resume", "--classes", "ball", "--json"],
                                env=TRAIN_ENV)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert any("(2 → 1 samples); epoch 1 ends after the 1 step(s) it had, and training continues with epoch 2 over "
               "the new set" in w for w in summary["warnings"])
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["step"], e["samples"]) for e in epochs] == [(1, 1, 1), (2, 2, 1)]


def test_itk_warnings_with_build_paths_stay_off_stderr(tmp_path, capfd):
    """A sheared sform beside a plain qform: ITK prints 'WARNING: In /…/itkNiftiImageIO.cxx, line …' itself."""
    import nibabel as nib
    import numpy as np

    from fastsam3d_cli.imaging.volumes import read_image

    sheared = np.array([[2.0, 0.3, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    image = nib.Nifti1Image(np.ones((10, 12, 14), np.int16), sheared)
    image.set_qform(np.diag([2.0, 2.0, 3.0, 1.0]), code=1)
    image.set_sform(sheared, code=2)
    nib.save(image, str(tmp_path / "sheared.nii.gz"))
    capfd.readouterr()
    assert read_image(tmp_path / "sheared.nii.gz").GetSize() == (10, 12, 14)
    assert capfd.readouterr().err == ""
