"""The decoder's CPU fast paths compute exactly what the reference modules compute (within float rounding).

The golden parity test covers them for the published weights at batch 1; these check random weights,
batch > 1, several mask tokens, and that gradients still flow in training mode.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastsam3d_cli.model.common import two_level_block_order
from fastsam3d_cli.model.mask_decoder import upscale_and_project
from fastsam3d_cli.model.prompt_encoder import downscale_mask
from fastsam3d_cli.model.sam3d import build_model
from fastsam3d_cli.model.transformer import Attention


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def _close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Float64 throughout, so a wrong reordering shows as an error far above rounding."""
    assert ours.dtype == reference.dtype == torch.float64
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= 1e-10 * reference.abs().max()


@pytest.fixture(scope="module")
def tiny_model():
    model = build_model("fastsam3d-tiny", "exact", "cpu").double()
    _randomise(model.prompt_encoder.mask_downscaling, 1)
    _randomise(model.mask_decoder.output_upscaling, 2)
    return model


@pytest.mark.parametrize("mode", ["no_grad", "inference"])
def test_mask_downscaling_equals_the_convolutions(tiny_model, mode):
    downscaling = tiny_model.prompt_encoder.mask_downscaling
    masks = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        _close(downscale_mask(masks, downscaling), downscaling(masks))


def test_mask_downscaling_gradients_equal_the_convolutions(tiny_model):
    """Also after an inference-mode call first built the cached gather index (validation inside training)."""
    downscaling = tiny_model.prompt_encoder.mask_downscaling
    two_level_block_order.cache_clear()
    with torch.inference_mode():
        downscale_mask(torch.zeros(1, 1, 32, 32, 32, dtype=torch.float64), downscaling)
    masks = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64).requires_grad_()
    grads = []
    for run in (lambda: downscale_mask(masks, downscaling), lambda: downscaling(masks)):
        downscaling.zero_grad()
        (run() ** 2).mean().backward()
        grads.append(downscaling[3].weight.grad.clone())
    _close(grads[0], grads[1])


@pytest.mark.parametrize("mode", ["grad", "inference"])
def test_upscale_and_project_equals_upscaling_then_hypernetwork_product(tiny_model, mode):
    upscaling = tiny_model.mask_decoder.output_upscaling
    generator = torch.Generator().manual_seed(5)
    src = torch.randn(2, 384, 8, 8, 8, generator=generator, dtype=torch.float64)
    hyper_in = torch.randn(2, 3, 48, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        reference = (hyper_in @ upscaling(src).flatten(2)).reshape(2, 3, 32, 32, 32)
    context = torch.enable_grad() if mode == "grad" else torch.inference_mode()
    with context:
        ours = upscale_and_project(src, upscaling, hyper_in)
    _close(ours.detach() if mode == "grad" else ours, reference)


@pytest.mark.parametrize("n_queries,n_keys", [(512, 3), (3, 512), (5, 5)])
def test_attention_reassociations_equal_plain_attention(n_queries, n_keys):
    """Few keys (image → tokens), few queries (tokens → image) and the plain path, vs explicit attention."""
    torch.manual_seed(6)
    attention = Attention(384, 8, downsample_rate=2).double()
    _randomise(attention, 7)
    q, k, v = (torch.randn(2, n, 384, dtype=torch.float64) for n in (n_queries, n_keys, n_keys))
    with torch.no_grad():
        heads = lambda x: x.reshape(2, -1, 8, 24).transpose(1, 2)  # noqa: E731
        qh, kh, vh = heads(attention.q_proj(q)), heads(attention.k_proj(k)), heads(attention.v_proj(v))
        weights = F.softmax(qh @ kh.transpose(-1, -2) / 24 ** 0.5, dim=-1)
        reference = attention.out_proj((weights @ vh).transpose(1, 2).reshape(2, n_queries, 192))
        _close(attention(q, k, v), reference)
