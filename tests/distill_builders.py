"""Builders shared by the distillation tests: small teacher/student configs and checkpoints. No tests live here.

The API accepts any `ModelConfig`, so most tests distil a 4-block, 48-wide teacher into a 2-block, 24-wide
student on 64³ crops with a 48-channel embedding (a whole run takes seconds on a CPU). The CLI only offers
the real students, so its tests use a teacher that is compatible with fastsam3d-tiny (128³ crops, 384-channel
embedding, the shared prompt encoder and decoder) but only 48 wide.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastsam3d_cli.model import build_model
from fastsam3d_cli.model.checkpoint import save_checkpoint
from fastsam3d_cli.model.config import EncoderConfig, ModelConfig

CLI_ENV = {"NO_COLOR": "1", "COLUMNS": "200"}


def small_config(name: str, width: int, depth: int, img_size: int = 64) -> ModelConfig:
    """A global-attention ViT of `width`×`depth` on `img_size`³ crops, 48-channel embedding and decoder."""
    return ModelConfig(name=name, encoder=EncoderConfig(
        embed_dim=width, depth=depth, num_heads=2, img_size=img_size, window_size=0, global_attn_indexes=(),
        rel_pos_layout="standard", out_chans=48), prompt_embed_dim=48, decoder_num_heads=4, decoder_mlp_dim=96,
        iou_head_hidden_dim=32)


TEACHER = small_config("test-teacher", 48, 4)
STUDENT = small_config("test-student", 24, 2)
# fastsam3d-tiny compatible (128³, 384 channels, the published decoder shapes), narrow and 6 blocks deep.
TINY_COMPATIBLE_TEACHER = ModelConfig(name="tiny-compatible-teacher", encoder=EncoderConfig(
    embed_dim=48, depth=6, num_heads=2, window_size=0, global_attn_indexes=(), rel_pos_layout="standard"))


def save_teacher(path: Path, config: ModelConfig = TEACHER, seed: int = 0) -> Path:
    """A randomly initialised teacher saved with its config (so `load_model` needs no preset)."""
    torch.manual_seed(seed)
    model = build_model(config)
    save_checkpoint(path, model.state_dict(), config=config.to_dict())
    return path


def register_preset(monkeypatch, config: ModelConfig = STUDENT) -> str:
    """Make a small config selectable by name (`train --model NAME`) for one test; returns the name.

    `train` takes preset names only; with STUDENT registered its runs take a fraction of a second a step.
    """
    from fastsam3d_cli.model.config import PRESETS

    monkeypatch.setitem(PRESETS, config.name, config)
    return config.name


def distil_student(prepared: Path, root: Path, seed: int = 0) -> Path:
    """A real (one epoch per stage) distillation of TEACHER into STUDENT; returns the full student.pth."""
    from fastsam3d_cli.training.distill import distill

    teacher = save_teacher(root / "teacher.pth", seed=seed)
    result = distill([prepared], teacher, student=STUDENT, teacher_model=None, epochs_per_stage=1,
                     output=root / "distill", lr=3e-4, seed=seed, device="cpu")
    assert result.student_checkpoint is not None
    return result.student_checkpoint
