"""Numerical parity with the published SAM-Med3D and FastSAM3D under deterministic weights.

Every tensor saved in ../shared/golden must match within max|ours − golden| ≤ 1e-4 · max|golden|, for every
attention backend that claims to be exact on this device (`exact` and `sdpa`; the `sdpa` teacher uses the
factorised padded window).
"""
from __future__ import annotations

import pytest
import torch

from fastsam3d_cli.model import EXACT_BACKENDS, build_model
from golden_weights import golden_inputs, golden_state_dict

MODELS = {"sam-med3d": ("keys_sam_med3d.json", "sam_med3d.pt"), "fastsam3d": ("keys_fastsam3d.json", "fastsam3d.pt")}
RELATIVE_TOLERANCE = 1e-4


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", autouse=True)
def full_float32_on_cuda():
    """CUDA runs float32 convolutions (and, if enabled, matmuls) in TF32 by default: ~10 bits of mantissa,
    several times the tolerance here. Parity is about the float32 arithmetic, so TF32 is off while it runs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module", params=list(MODELS))
def golden_model(request, golden_dir):
    """(preset, model with deterministic weights, golden tensors)."""
    manifest, outputs = MODELS[request.param]
    model = build_model(request.param, attention="exact", device=_device())
    model.load_state_dict(golden_state_dict(golden_dir, manifest), strict=True)
    golden = torch.load(golden_dir / outputs, map_location="cpu", weights_only=True)
    return request.param, model, golden


def _run_reference_calls(model, golden) -> dict[str, torch.Tensor]:
    """Call the modules exactly as the golden generator did (golden README §3)."""
    device = model.device
    image, coords, labels, mask = (t.to(device) for t in golden_inputs())
    block_numbers = sorted(int(k.rsplit(".", 1)[1]) for k in golden if k.startswith("encoder.block_out."))
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        embedding, blocks = model.image_encoder.forward_with_intermediates(image, block_numbers)
        out["image_embeddings"] = embedding
        out.update({f"encoder.block_out.{n}": blocks[n] for n in block_numbers})
        dense_pe = model.prompt_encoder.get_dense_pe()
        out["dense_pe"] = dense_pe
        for case, mask_prompt in (("a", None), ("b", mask)):
            sparse, dense = model.prompt_encoder((coords, labels), mask_prompt)
            out[f"{case}.sparse_embeddings"], out[f"{case}.dense_embeddings"] = sparse, dense
            low, iou = model.mask_decoder(embedding, dense_pe, sparse, dense, multimask_output=False)
            out[f"{case}.low_res_logits"], out[f"{case}.iou_pred"] = low, iou
            all_low, all_iou = model.mask_decoder.predict_masks(embedding, dense_pe, sparse, dense)
            out[f"{case}.all_low_res_logits"], out[f"{case}.all_iou_pred"] = all_low, all_iou
    return {k: v.float().cpu() for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_every_golden_tensor_matches(golden_model, backend):
    name, model, golden = golden_model
    model.set_attention(backend)
    ours = _run_reference_calls(model, golden)
    assert set(ours) == set(golden), "the parity test must cover every saved tensor"
    failures = []
    for key, reference in golden.items():
        assert ours[key].shape == reference.shape, key
        error = (ours[key] - reference).abs().max().item()
        scale = reference.abs().max().item()
        tolerance = 1e-5 if key == "dense_pe" else RELATIVE_TOLERANCE * scale
        if not error <= tolerance:
            failures.append(f"{key}: max|Δ| = {error:.3e} > {tolerance:.3e}")
    assert not failures, f"{name}/{backend} differs from the reference:\n" + "\n".join(failures)


def test_decode_api_matches_golden_case_b(golden_dir):
    """The public encode/decode API returns the same low-res logits as the module-level calls."""
    manifest, outputs = MODELS["fastsam3d"]
    model = build_model("fastsam3d", attention="sdpa", device=_device())
    model.load_state_dict(golden_state_dict(golden_dir, manifest), strict=True)
    golden = torch.load(golden_dir / outputs, map_location="cpu", weights_only=True)
    image, coords, labels, mask = (t.to(model.device) for t in golden_inputs())
    with torch.inference_mode():
        low, iou = (t.cpu() for t in model.decode(model.encode(image), coords, labels, mask))
    reference = golden["b.low_res_logits"]
    assert (low - reference).abs().max() <= RELATIVE_TOLERANCE * reference.abs().max()
    assert (iou - golden["b.iou_pred"]).abs().max() <= RELATIVE_TOLERANCE * golden["b.iou_pred"].abs().max()
