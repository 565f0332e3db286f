"""A micro model preset for the weights-cache tests: real checkpoints of about 1 MB in the official layout.

`weights import` and `weights download` check a file as strictly as loading does (all the model's keys and
shapes, issue 15 item 13), so the cache's tests need real checkpoints; the published models' are 400-640 MB.
`use_micro_preset` registers this preset and points the published name ('fastsam3d' by default) at it, so the
cache's rules are exercised on a file a test can build in milliseconds.
"""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from fastsam3d_cli.model import config as model_config
from fastsam3d_cli.model.config import EncoderConfig, ModelConfig

MICRO = ModelConfig(
    name="weights-test-micro",
    encoder=EncoderConfig(embed_dim=64, depth=1, num_heads=2, window_size=0, global_attn_indexes=(),
                          out_chans=32, rel_pos_layout="standard"),
    prompt_embed_dim=32, mask_in_chans=4, decoder_num_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32)


def use_micro_preset(monkeypatch: pytest.MonkeyPatch, name: str = "fastsam3d") -> None:
    """Register MICRO as a preset and make the registry's `name` a checkpoint of it."""
    from fastsam3d_cli.weights import cache

    monkeypatch.setitem(model_config.PRESETS, MICRO.name, MICRO)
    spec = cache.BUILTIN_REGISTRY[name]
    monkeypatch.setitem(cache.BUILTIN_REGISTRY, name, dataclasses.replace(spec, preset=MICRO.name))


def micro_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """MICRO's state dict with weights drawn from `seed` (the same seed, the same bytes)."""
    from fastsam3d_cli.model import build_model

    torch.manual_seed(seed)
    return build_model(MICRO).state_dict()


def micro_checkpoint_bytes(seed: int = 0, drop: tuple[str, ...] = ()) -> bytes:
    """A training-layout checkpoint {'model_state_dict': ...} of MICRO, without the keys in `drop`."""
    state = {key: value for key, value in micro_state_dict(seed).items() if key not in drop}
    buffer = io.BytesIO()
    torch.save({"model_state_dict": state, "epoch": 1}, buffer)
    return buffer.getvalue()
