"""Model core: presets, state-dict layout, the API, and the attention backends' equivalences."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fastsam3d_cli.errors import DeviceError, UsageError
from fastsam3d_cli.model import PRESETS, Sam3D, build_model, get_config
from fastsam3d_cli.model.attention import (EncoderAttention, fold_bias, rel_pos_bias, rel_pos_terms,
                                           resolve_backend, sparse_groups)
from fastsam3d_cli.model.checkpoint import expected_shapes
from fastsam3d_cli.model.config import EncoderConfig, ModelConfig


@pytest.mark.parametrize("preset, manifest", [("sam-med3d", "keys_sam_med3d.json"),
                                              ("fastsam3d", "keys_fastsam3d.json")])
def test_state_dict_keys_and_shapes_equal_the_official_manifest(golden_dir, preset, manifest):
    official = [(key, tuple(shape)) for key, shape in json.loads((golden_dir / manifest).read_text())]
    ours = list(expected_shapes(preset).items())
    assert ours == official  # same keys, same shapes, same registration order


@pytest.mark.parametrize("preset, params", [("sam-med3d", 100_509_232), ("fastsam3d", 53_224_240)])
def test_parameter_counts_match_the_published_models(preset, params):
    with torch.device("meta"):
        model = Sam3D(get_config(preset))
    assert sum(p.numel() for p in model.parameters()) == params


def test_tiny_preset_is_a_real_vit_tiny_with_the_shared_decoder():
    tiny, student = expected_shapes("fastsam3d-tiny"), expected_shapes("fastsam3d")
    assert tiny["image_encoder.pos_embed"] == (1, 8, 8, 8, 192)
    assert tiny["image_encoder.blocks.0.attn.qkv.weight"] == (576, 192)
    assert tiny["image_encoder.blocks.0.attn.rel_pos_d"] == (15, 64)  # 3 heads × 64
    assert sum(1 for k in tiny if k.startswith("image_encoder.") and k.endswith("mlp.lin1.weight")) == 6
    assert tiny["image_encoder.neck.0.weight"] == (384, 192, 1, 1, 1)
    for key, shape in student.items():
        if not key.startswith("image_encoder."):
            assert tiny[key] == shape


def test_unknown_preset_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown model 'vit-huge'"):
        build_model("vit-huge")


def test_config_round_trips_through_a_dict():
    for config in PRESETS.values():
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_api_shapes_and_validation():
    model = build_model("fastsam3d-tiny", attention="sdpa")
    volume = torch.randn(2, 1, 128, 128, 128)
    with torch.inference_mode():
        embedding = model.encode(volume)
        assert embedding.shape == (2, 384, 8, 8, 8)
        points = torch.tensor([[[10.0, 20.0, 30.0]], [[64.0, 64.0, 64.0]]])
        labels = torch.tensor([[1], [0]])
        low, iou = model.decode(embedding, points, labels, torch.zeros(2, 1, 32, 32, 32))
        assert low.shape == (2, 1, 32, 32, 32) and iou.shape == (2, 1)
        low_mask_only, _ = model.decode(embedding, None, None, low)
        assert low_mask_only.shape == (2, 1, 32, 32, 32)
        assert model.upsample_logits(low).shape == (2, 1, 128, 128, 128)
    with pytest.raises(ValueError, match=r"\(B, 1, 128, 128, 128\)"):
        model.encode(torch.randn(1, 1, 64, 64, 64))
    with pytest.raises(ValueError, match="points must be"):
        model.decode(embedding, torch.zeros(2, 3), labels)


def test_clicks_change_the_prediction():
    """The prompt path is wired: an include click and an exclude click give different logits."""
    torch.manual_seed(0)
    model = build_model("fastsam3d-tiny", attention="sdpa")
    with torch.inference_mode():
        embedding = model.encode(torch.randn(1, 1, 128, 128, 128))
        point = torch.tensor([[[40.0, 50.0, 60.0]]])
        include, _ = model.decode(embedding, point, torch.tensor([[1]]), torch.zeros(1, 1, 32, 32, 32))
        exclude, _ = model.decode(embedding, point, torch.tensor([[0]]), torch.zeros(1, 1, 32, 32, 32))
    assert (include - exclude).abs().max() > 1e-4


# ------------------------------------------------------------------------------------ backends
def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (incl. rel-pos tables and qkv biases) non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "rel_pos" in name or "qkv.bias" in name else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm1.weight") else 0.0))
    return model


def _small_windowed_config(layout: str) -> ModelConfig:
    """A narrow SAM-Med3D-shaped encoder (windowed 14³ + global blocks) that runs in a second."""
    encoder = EncoderConfig(embed_dim=64, depth=3, num_heads=2, window_size=14, global_attn_indexes=(1,),
                            rel_pos_layout=layout)
    return ModelConfig(name="test-windowed", encoder=encoder)


def test_padded_window_factorisation_equals_materialised_window():
    """sdpa's virtual-key window equals the reference's zero-padded 14³ window (random weights)."""
    model = _randomised(Sam3D(_small_windowed_config("published")).eval())
    volume = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        model.set_attention("exact")
        reference, ref_blocks = model.image_encoder.forward_with_intermediates(volume, [1, 2, 3])
        model.set_attention("sdpa")
        assert model.image_encoder.blocks[0].attn.supports_padded_window()
        ours, our_blocks = model.image_encoder.forward_with_intermediates(volume, [1, 2, 3])
    for n in (1, 2, 3):
        assert torch.allclose(our_blocks[n], ref_blocks[n], rtol=0, atol=2e-5 * ref_blocks[n].abs().max())
    assert torch.allclose(ours, reference, rtol=0, atol=2e-5 * reference.abs().max())


@pytest.mark.parametrize("layout", ["published", "standard"])
def test_sdpa_equals_exact_for_global_attention(layout):
    torch.manual_seed(1)
    attn = _randomised(EncoderAttention(96, 3, True, True, 8, layout))
    x = torch.randn(2, 8, 8, 8, 96)
    with torch.inference_mode():
        attn.backend = "exact"
        reference = attn(x)
        attn.backend = "sdpa"
        ours = attn(x)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-5 * reference.abs().max())


def test_published_layout_differs_from_standard():
    """The published models' bias is NOT the textbook one (why both layouts exist)."""
    torch.manual_seed(2)
    q = torch.randn(2, 512, 16)
    tables = tuple(torch.randn(15, 16) for _ in range(3))
    published = rel_pos_bias(q, (8, 8, 8), tables, "published")
    standard = rel_pos_bias(q, (8, 8, 8), tables, "standard")
    assert (published - standard).abs().max() > 0.1
    # Spot-check the published formula: bias(q,k) = q·Td[qd,kw] + q(qd,qh,kd)·Th[qh,kw] + q(qd,qh,kh)·Tw[kh,kw].
    rel_d, rel_h, rel_w = rel_pos_terms(q, (8, 8, 8), tables)
    qd, qh, qw, kd, kh, kw = 1, 2, 3, 4, 5, 6
    expected = rel_d[0, qd, qh, qw, kw] + rel_h[0, qd, qh, kd, kw] + rel_w[0, qd, qh, kh, kw]
    flat_q, flat_k = qd * 64 + qh * 8 + qw, kd * 64 + kh * 8 + kw
    assert torch.allclose(published[0, flat_q, flat_k], expected, atol=1e-5)


def test_sparse_attention_groups_cover_every_token_once():
    groups = sparse_groups(512, 512, 8, torch.device("cpu"))
    assert groups.shape == (8, 64)
    assert sorted(groups.flatten().tolist()) == list(range(512))
    assert all(len({int(t) % 8 for t in row}) == 1 for row in groups)  # one residue class per group


def test_sparse_attention_is_masked_attention_without_token_scrambling():
    """sparse == full attention restricted to same-group pairs, every output at its own position."""
    torch.manual_seed(3)
    attn = _randomised(EncoderAttention(96, 3, True, True, 8, "standard"))
    x = torch.randn(1, 8, 8, 8, 96)
    with torch.inference_mode():
        attn.backend = "sparse"
        ours = attn(x)
        q, k, v = attn._split_qkv(x.reshape(1, 512, 96))
        groups = sparse_groups(512, 512, 8, torch.device("cpu"))
        group_of = torch.empty(512, dtype=torch.long)
        for index, row in enumerate(groups):
            group_of[row] = index
        same_group = group_of[:, None] == group_of[None, :]
        bias = rel_pos_bias(q, (8, 8, 8), attn._tables(), "standard").masked_fill(~same_group, float("-inf"))
        reference = attn._merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), 1, (8, 8, 8))
    assert torch.allclose(ours, reference, rtol=0, atol=1e-5 * reference.abs().max())


def test_bias_folding_used_by_flash_is_exact():
    """q'·k' = q·k·scale + bias, so a bias-free kernel with scale 1 gives biased attention (CPU check)."""
    torch.manual_seed(4)
    attn = _randomised(EncoderAttention(96, 3, True, True, 8, "standard"))
    q, k, v = attn._split_qkv(torch.randn(1, 512, 96))
    rel = rel_pos_terms(q, (8, 8, 8), attn._tables())
    q_extra = torch.cat([t.reshape(q.shape[0], 512, -1) for t in rel], dim=-1)
    from fastsam3d_cli.model.attention import axis_one_hot
    qa, ka, va = fold_bias(q, k, v, attn.scale, q_extra, axis_one_hot((8, 8, 8), q.device, q.dtype))
    assert qa.shape[-1] % 8 == 0 and qa.shape[-1] == ka.shape[-1] == va.shape[-1]
    folded = F.scaled_dot_product_attention(qa, ka, va, scale=1.0)[..., :v.shape[-1]]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=rel_pos_bias(q, (8, 8, 8), attn._tables(), "standard"))
    assert torch.allclose(folded, reference, atol=1e-5)


def test_backend_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("exact", cpu) == "exact"
    with pytest.raises(UsageError, match="unknown attention backend"):
        resolve_backend("fast", cpu)
    with pytest.raises((DeviceError, UsageError), match="flash"):
        resolve_backend("flash", cpu)
    with pytest.raises(UsageError, match="relative-position layout"):
        resolve_backend("flash", cpu, flash_supported=False)


def test_tiny_student_backends_agree():
    model = _randomised(build_model("fastsam3d-tiny"))
    volume = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        model.set_attention("exact")
        reference = model.encode(volume)
        model.set_attention("sdpa")
        ours = model.encode(volume)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-4 * reference.abs().max())


def test_custom_config_without_window_padding_still_partitions_exactly():
    """A grid larger than the window (2×2×2 windows) goes through the partition path for every backend."""
    config = replace(_small_windowed_config("published"), encoder=replace(
        _small_windowed_config("published").encoder, window_size=4, global_attn_indexes=()))
    model = _randomised(Sam3D(config).eval())
    volume = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        model.set_attention("exact")
        reference = model.encode(volume)
        model.set_attention("sdpa")
        ours = model.encode(volume)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-5 * reference.abs().max())
