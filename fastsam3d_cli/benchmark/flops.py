"""FLOPs, MACs and parameters per model component, counted with `torch.utils.flop_counter`.

Convention: one multiply-add = 2 FLOPs, and MACs = FLOPs / 2 (the unit `thop` reports, which is what the
FastSAM3D paper quotes). Counts are for ONE 128³ volume (batch 1): one `encode`, and one decoder step
(prompt encoder + mask decoder) with one new click and the previous 32³ low-res logits.

What is counted: every op torch's FLOP counter has a formula for — matrix products (`mm`, `addmm`,
`bmm`), convolutions, and the fused attention kernels (`_scaled_dot_product_*`, plus a formula added here
for the fused CPU kernel that 4-D `sdpa` inputs take on CPU). Not counted:
element-wise ops, softmax, normalisation and interpolation (a few percent at most). Under the counter,
`scaled_dot_product_attention` on CPU/meta runs its math decomposition, so the `sdpa` backend's
attention matmuls ARE counted (as `bmm`). `thop` counts only Linear/Conv layers: in the encoder that is
`addmm` + `convolution` in `by_op` (teacher ≈ 89.4 G, student ≈ 23.1 G); `bmm` is the attention matmuls
and the relative-position einsums, which `thop` misses.

The encoder is counted on the meta device (no memory, no arithmetic, independent of the timing device and
dtype). The decoder step uses data-dependent indexing that meta tensors cannot run, so it runs on CPU with
zero-filled weights (values never change a FLOP count). The `flash` backend (flash-attn kernels) has no
formula; it is counted with the `sdpa` arithmetic — the same products, except that flash-attn's folded bias
widens the head dimension by 24 (rounded up to a multiple of 8) in q·kᵀ.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from fastsam3d_cli.model import build_model
from fastsam3d_cli.model.sam3d import Sam3D

COUNTING_CONVENTION = ("1 multiply-add = 2 FLOPs; MACs = FLOPs / 2 (thop's unit, used by the paper); per 128³ "
                       "volume at batch 1; matmuls, convolutions and fused attention counted, element-wise "
                       "ops/softmax/norms/interpolation not; encoder by_op: addmm+convolution = what thop "
                       "counts, bmm = attention matmuls and relative-position einsums")
# Backends whose arithmetic torch's counter cannot see are counted with a stand-in of the same products.
COUNTED_AS = {"flash": "sdpa", "auto": "sdpa"}


@dataclass
class ComponentFlops:
    """FLOPs of one component for one call, split by aten op (values in FLOPs)."""

    flops: int
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def macs(self) -> float:
        return self.flops / 2

    def to_dict(self) -> dict:
        return {"gflops": self.flops / 1e9, "gmacs": self.macs / 1e9,
                "by_op_gmacs": {op: count / 2e9 for op, count in sorted(self.by_op.items())}}


@dataclass
class ModelFlops:
    """FLOPs per component and parameters per component for one model and attention arithmetic."""

    model: str
    counted_backend: str  # the backend whose arithmetic was counted (see COUNTED_AS)
    image_encoder: ComponentFlops
    prompt_encoder: ComponentFlops
    mask_decoder: ComponentFlops
    params: dict[str, int]  # image_encoder, prompt_encoder, mask_decoder, total

    @property
    def decoder_step(self) -> ComponentFlops:
        """Prompt encoder + mask decoder for one click (what runs per interaction)."""
        by_op = dict(self.prompt_encoder.by_op)
        for op, count in self.mask_decoder.by_op.items():
            by_op[op] = by_op.get(op, 0) + count
        return ComponentFlops(self.prompt_encoder.flops + self.mask_decoder.flops, by_op)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(image_encoder=self.image_encoder.to_dict(), prompt_encoder=self.prompt_encoder.to_dict(),
                    mask_decoder=self.mask_decoder.to_dict(), decoder_step=self.decoder_step.to_dict(),
                    convention=COUNTING_CONVENTION)
        return data


def _extra_formulas() -> dict:
    """FLOP formulas torch's counter lacks: the fused CPU attention kernel (4-D sdpa on CPU, e.g. the mask
    decoder's) — counted like the CUDA kernels (q·kᵀ and attention·v)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: cpu_flash_flops}


def count_flops(fn, *args, **kwargs) -> ComponentFlops:
    """Run `fn(*args, **kwargs)` under FlopCounterMode (inference mode) and return what it counted."""
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with counter, torch.inference_mode():
        fn(*args, **kwargs)
    by_op = {str(op).removeprefix("aten."): int(count) for op, count in counter.get_flop_counts()["Global"].items()}
    return ComponentFlops(int(counter.get_total_flops()), by_op)


def parameter_counts(model: Sam3D) -> dict[str, int]:
    """Number of parameters of each component and of the whole model (works on meta tensors)."""
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("image_encoder", "prompt_encoder", "mask_decoder")}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def model_flops(model_name: str, backend: str = "exact") -> ModelFlops:
    """Count the encoder (one 128³ volume) and one decoder step of preset `model_name` with `backend`'s arithmetic.

    `backend` is a concrete backend name (exact, sdpa, sparse) or one from COUNTED_AS. Raises UsageError for an
    unknown model or backend.
    """
    counted = COUNTED_AS.get(backend, backend)
    with torch.device("meta"):
        model = build_model(model_name, attention="exact")
    model.set_attention(counted, device=torch.device("meta"))
    size = model.config.image_size
    volume = torch.randn(1, 1, size, size, size, device="meta")
    encoder = count_flops(model.encode, volume)

    _materialise_zeros(model.prompt_encoder, model.mask_decoder)
    embedding = torch.randn(1, model.config.prompt_embed_dim, *(model.config.embedding_size,) * 3)
    low = model.config.low_res_size
    previous_logits = torch.randn(1, 1, low, low, low)
    points = torch.full((1, 1, 3), size / 2)
    labels = torch.ones(1, 1, dtype=torch.long)
    prompt = count_flops(model.prompt_encoder, (points, labels), previous_logits, batch_size=1)
    step = count_flops(model.decode, embedding, points, labels, previous_logits)
    decoder_by_op = {op: count - prompt.by_op.get(op, 0) for op, count in step.by_op.items()}
    decoder = ComponentFlops(step.flops - prompt.flops, {op: c for op, c in decoder_by_op.items() if c})
    return ModelFlops(model_name, counted, encoder, prompt, decoder, parameter_counts(model))


def _materialise_zeros(*modules: torch.nn.Module) -> None:
    """Move meta modules to CPU memory filled with zeros (enough to run them for counting)."""
    for module in modules:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.zero_()
