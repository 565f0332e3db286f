"""`distill` API: stage schedule, student init, projections, the progressive run, the saved student, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastsam3d_cli.training.distill import (DistillationModel, StageSchedule, distill, init_student_from_teacher,
                                   teacher_intermediates)
from fastsam3d_cli.errors import UsageError, WeightsError
from fastsam3d_cli.training.feature_cache import FeatureCache, sha256_file
from fastsam3d_cli.model import build_model
from fastsam3d_cli.model.checkpoint import load_model, read_checkpoint
from fastsam3d_cli.model.image_encoder import ImageEncoderViT3D
from distill_builders import STUDENT, TEACHER, save_teacher, small_config
from train_phantoms import make_prepared


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A prepared folder (2 cases × 2 classes) and a saved small teacher."""
    root = tmp_path_factory.mktemp("distill")
    return {"prepared": make_prepared(root / "prepared"), "teacher": save_teacher(root / "teacher.pth"),
            "root": root}


@pytest.fixture(scope="module")
def finished_run(setup):
    """One complete distillation: 3 stages × 3 epochs on 4 samples."""
    torch.set_num_threads(1)
    run_dir = setup["root"] / "run"
    result = distill([setup["prepared"]], setup["teacher"], student=STUDENT, teacher_model=None, epochs_per_stage=3,
                     output=run_dir, cache_features=setup["root"] / "cache", lr=3e-4, seed=7)
    return result


# ------------------------------------------------------------------------------------------- schedule
def test_schedule_pairs_student_block_k_with_teacher_block_2k_then_the_necks():
    schedule = StageSchedule(teacher_depth=12, student_depth=6, epochs_per_stage=3)
    pairs = [(s.number, s.student_block, s.teacher_block, s.target) for s in schedule.stages]
    assert pairs == [(1, 1, 2, "block_2"), (2, 2, 4, "block_4"), (3, 3, 6, "block_6"), (4, 4, 8, "block_8"),
                     (5, 5, 10, "block_10"), (6, 6, 12, "block_12"), (7, None, None, "neck")]
    assert schedule.total_epochs == 21
    assert [schedule.stage_for_epoch(e).number for e in (0, 2, 3, 17, 18, 20)] == [1, 1, 2, 6, 7, 7]
    assert [e for e in range(21) if schedule.is_stage_end(e)] == [2, 5, 8, 11, 14, 17, 20]
    assert [s.teacher_block for s in StageSchedule(6, 3, 1).stages] == [2, 4, 6, None]
    with pytest.raises(UsageError, match="epochs-per-stage"):
        StageSchedule(12, 6, 0)
    with pytest.raises(UsageError, match="multiple of the student depth"):
        StageSchedule(12, 5, 1)


# ---------------------------------------------------------------------------------------- student init
def _encoder(width: int) -> ImageEncoderViT3D:
    return ImageEncoderViT3D(small_config("x", width, 2).encoder)


def test_init_from_teacher_copies_everything_that_fits():
    torch.manual_seed(0)
    teacher, same, narrow = _encoder(48), _encoder(48), _encoder(24)
    copied = init_student_from_teacher(same, teacher)
    assert set(copied) == {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "neck.0.weight",
                           "neck.1.weight", "neck.1.bias", "neck.2.weight", "neck.3.weight", "neck.3.bias"}
    for name in copied:
        assert torch.equal(same.state_dict()[name], teacher.state_dict()[name])
    assert not torch.equal(same.blocks[0].mlp.lin1.weight, teacher.blocks[0].mlp.lin1.weight)
    copied = init_student_from_teacher(narrow, teacher, freeze=True)
    assert set(copied) == {"neck.1.weight", "neck.1.bias", "neck.2.weight", "neck.3.weight", "neck.3.bias"}
    frozen = {n for n, p in narrow.named_parameters() if not p.requires_grad}
    assert frozen == set(copied)


def test_projections_exist_only_for_a_narrower_student_and_are_not_saved():
    same = DistillationModel(small_config("s", 48, 2), teacher_width=48, schedule=StageSchedule(4, 2, 1))
    assert len(same.projections) == 0
    model = DistillationModel(STUDENT, teacher_width=48, schedule=StageSchedule(4, 2, 1))
    assert sorted(model.projections) == ["1", "2"]
    assert model.projections["1"].in_features == 24 and model.projections["1"].out_features == 48
    assert not any(k.startswith("projections.") for k in model.student_state_dict())
    assert set(model.student_state_dict()) == set(build_model(STUDENT).state_dict())
    volume = torch.randn(1, 1, 64, 64, 64)
    stages = StageSchedule(4, 2, 1).stages
    assert model.forward_stage(volume, stages[0]).shape == (1, 4, 4, 4, 48)  # projected to the teacher's width
    assert model.forward_stage(volume, stages[2]).shape == (1, 48, 4, 4, 4)  # the neck, compared directly
    # the neck stage is exactly the encoder's own forward
    torch.testing.assert_close(model.forward_stage(volume, stages[2]), model.image_encoder(volume))


def test_teacher_intermediates_are_the_block_outputs():
    torch.manual_seed(1)
    teacher = build_model(TEACHER, attention="sdpa")
    volume = torch.randn(1, 1, 64, 64, 64)
    features = teacher_intermediates(teacher.image_encoder, volume, (2, 4))
    assert sorted(features) == ["block_2", "block_4", "neck"]
    torch.testing.assert_close(features["neck"], teacher.encode(volume).detach())
    assert features["block_2"].shape == (1, 4, 4, 4, 48)


# ---------------------------------------------------------------------------------------- the full run
def test_every_stage_lowers_its_mse_and_the_neck_ends_closer(finished_run):
    result = finished_run
    assert result.outcome.stop_reason == "completed" and result.outcome.epochs_completed == 9
    assert [s["pair"] for s in result.stages] == ["student block 1 ↔ teacher block 2",
                                                  "student block 2 ↔ teacher block 4", "student neck ↔ teacher neck"]
    for stage in result.stages:
        assert stage["epochs_done"] == 3
        assert stage["end_mse"] < 0.8 * stage["start_mse"], stage
        assert stage["last_epoch_loss"] < stage["first_epoch_loss"], stage
    assert result.neck_mse_final < 0.5 * result.neck_mse_init
    assert result.copied_from_teacher  # the neck tail (48 channels) fits


def test_logs_record_the_stage_of_every_epoch(finished_run):
    run_dir = finished_run.run_dir
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in epochs] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    ends = [e for e in epochs if "stage_end_mse" in e]
    assert [e["epoch"] for e in ends] == [3, 6, 9]
    stages = [json.loads(line) for line in (run_dir / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == [1, 2, 3]
    assert [s["end_mse"] for s in stages] == [e["stage_end_mse"] for e in ends]
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in steps] == [1] * 12 + [2] * 12 + [3] * 12  # 4 samples, batch 1
    assert (run_dir / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cache_header_names_the_teacher(finished_run, setup):
    cache = FeatureCache(finished_run.cache_dir)
    assert cache.identity.teacher_sha256 == sha256_file(setup["teacher"])
    assert cache.identity.crop_size == 64 and cache.identity.blocks == (2, 4) and len(cache) == 4
    assert finished_run.cache_bytes == cache.size_bytes > 0
    # the cached crop is what the teacher saw: recomputing its neck from the crop gives the cached neck
    teacher, _ = load_model(setup["teacher"], attention="sdpa")
    sample = cache.sample(1)
    neck = teacher.encode(torch.from_numpy(sample.crop)[None]).detach().numpy()[0]
    np.testing.assert_allclose(sample.neck, neck, atol=1e-2, rtol=1e-2)  # float16 storage


def test_saved_student_loads_and_segments(finished_run, setup):
    path = finished_run.student_checkpoint
    assert path == finished_run.run_dir / "student.pth"
    student, info = load_model(path, attention="sdpa")
    assert student.config == STUDENT and info.layout == "model_state_dict"
    state = read_checkpoint(path)
    teacher_state = read_checkpoint(setup["teacher"])
    assert not any(k.startswith("projections.") for k in state)
    for key, value in teacher_state.items():
        if key.startswith(("prompt_encoder.", "mask_decoder.")):
            assert torch.equal(state[key], value), key
    with torch.inference_mode():
        embedding = student.encode(torch.randn(1, 1, 64, 64, 64))
        low, iou = student.decode(embedding, torch.tensor([[[30.0, 30.0, 30.0]]]), torch.tensor([[1]]))
    assert embedding.shape == (1, 48, 4, 4, 4) and low.shape == (1, 1, 16, 16, 16) and iou.shape == (1, 1)


def test_resume_is_exact(setup, finished_run, tmp_path):
    """Stop inside stage 2 (mid-epoch), resume: the student equals an uninterrupted run's, bit for bit."""
    common = dict(student=STUDENT, teacher_model=None, epochs_per_stage=1, cache_features=finished_run.cache_dir,
                  lr=3e-4, seed=3)
    whole = distill([setup["prepared"]], setup["teacher"], output=tmp_path / "whole", **common)
    part = distill([setup["prepared"]], setup["teacher"], output=tmp_path / "part", max_steps=6, **common)
    assert part.outcome.stop_reason == "max_steps" and part.student_checkpoint is None
    assert part.outcome.epochs_completed == 1  # 4 steps per epoch: step 6 is inside stage 2
    # A different --lr / --seed on the resume command cannot apply (restored optimizer, sample order): they
    # are reported as ignored, and the result is still bit-exact.
    rest = distill([setup["prepared"]], setup["teacher"], output=tmp_path / "part", resume=True,
                   **{**common, "lr": 1e-2, "seed": 99})
    assert any("--lr 0.01 is ignored on resume: the run keeps its 0.0003" in w for w in rest.warnings), rest.warnings
    assert any("--seed 99 is ignored on resume: the run keeps its 3" in w for w in rest.warnings), rest.warnings
    assert rest.outcome.resumed_from_step == 6 and rest.outcome.stop_reason == "completed"
    assert rest.cache_computed == 0
    a, b = read_checkpoint(whole.student_checkpoint), read_checkpoint(rest.student_checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "whole" / "stages.jsonl").read_text() == (tmp_path / "part" / "stages.jsonl").read_text()
    assert rest.neck_mse_init == whole.neck_mse_init


def test_resume_with_another_student_or_teacher_is_refused(setup, finished_run, tmp_path):
    other_student = small_config("other-student", 24, 1)
    with pytest.raises(WeightsError, match="distillation into student 'test-student', not 'other-student'"):
        distill([setup["prepared"]], setup["teacher"], student=other_student, teacher_model=None,
                output=finished_run.run_dir, cache_features=tmp_path / "c", resume=True)
    other_teacher = save_teacher(tmp_path / "t2.pth", seed=5)
    with pytest.raises(WeightsError, match="distilled from another teacher"):
        distill([setup["prepared"]], other_teacher, student=STUDENT, teacher_model=None,
                output=finished_run.run_dir, cache_features=tmp_path / "c2", resume=True)
    with pytest.raises(UsageError, match="written with --epochs-per-stage 3, not 2"):
        distill([setup["prepared"]], setup["teacher"], student=STUDENT, teacher_model=None, epochs_per_stage=2,
                output=finished_run.run_dir, cache_features=tmp_path / "c3", resume=True)
    assert not any((tmp_path / name).exists() for name in ("c", "c2", "c3"))


def test_student_init_from_an_encoder_only_checkpoint(setup, finished_run, tmp_path):
    """FastSAM3D's distillation output (encoder keys without prefix) starts the student; no teacher copy on top."""
    from fastsam3d_cli.model.checkpoint import save_checkpoint

    full = read_checkpoint(finished_run.student_checkpoint)
    encoder_only = {k[len("image_encoder."):]: v for k, v in full.items() if k.startswith("image_encoder.")}
    save_checkpoint(tmp_path / "encoder.pth", encoder_only)
    result = distill([setup["prepared"]], setup["teacher"], student=STUDENT, teacher_model=None, epochs_per_stage=1,
                     student_init=tmp_path / "encoder.pth", output=tmp_path / "run",
                     cache_features=finished_run.cache_dir, max_steps=0)
    assert result.copied_from_teacher == []
    assert result.neck_mse_init == pytest.approx(finished_run.neck_mse_final, rel=1e-4)  # starts where that run ended
    with pytest.raises(WeightsError, match="--student-init .*encoder.pth does not fit model 'wider-student'") as info:
        distill([setup["prepared"]], setup["teacher"], student=small_config("wider-student", 32, 2),
                teacher_model=None, student_init=tmp_path / "encoder.pth", output=tmp_path / "run2")
    assert any("wrong shape" in line for line in info.value.details)
    assert not (tmp_path / "run2").exists()
