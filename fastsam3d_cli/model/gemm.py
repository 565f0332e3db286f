"""Dense layers (x @ Wᵀ + b) on the CPU, on oneDNN instead of the BLAS behind `torch.addmm`.

Why: PyTorch's CPU wheels run float32 `addmm`/`F.linear` on Intel MKL, which on AMD CPUs takes a generic
AVX2 code path. oneDNN (bundled in the same wheel) picks its kernels by the instructions the CPU has.
Measured on the 2-core AMD EPYC (Zen 5, AVX-512) these tools are benchmarked on: 187–217 GFLOP/s for MKL
and 464–484 GFLOP/s for oneDNN on the encoder's shapes, with float32 arithmetic (max error against a
float64 product 1.2e-4 vs 5.4e-5 for MKL, on a 768-long dot product of unit normals; bfloat16: 0.54).

Inference calls the oneDNN op directly. Training goes through `_OneDNNLinear`, whose backward is two
more oneDNN products (grad_x = grad·W, grad_W = gradᵀ·x) and a sum for the bias: a `fastsam3d` training
step on 2 cores went 1.60 → 0.98 s. Everything that could see a difference keeps `F.linear`: non-CPU
tensors, other dtypes (bfloat16 too on a CPU without oneDNN's bfloat16 kernels), autocast, tracing/compiling, an active dispatch mode (FLOP counting sees plain
aten ops), and products under `MIN_MACS` multiply-adds (faster on MKL). `FASTSAM3D_CPU_GEMM=aten` turns
it all off for the process (read once, at import).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

# Products smaller than this many multiply-adds stay on aten: there oneDNN's call overhead outweighs its
# faster kernel (measured: 1×384×384 16 µs vs 9 µs; 8×384×384 26 vs 28 µs; 8×384×2048 111 vs 193 µs).
MIN_MACS = 1 << 20


def _find_onednn_linear():
    """The oneDNN linear op of this torch build, or None (build without oneDNN, or opted out)."""
    if os.environ.get("FASTSAM3D_CPU_GEMM", "onednn").strip().lower() == "aten":
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_onednn_linear = _find_onednn_linear()


def _onednn_has_bf16() -> bool:
    """Whether this CPU has oneDNN's bfloat16 inner product (AVX-512 BF16 / AMX; an AVX2-only CPU has none)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_BF16 = _onednn_linear is not None and _onednn_has_bf16()


def uses_onednn() -> bool:
    """Whether CPU dense layers run on oneDNN in this process (recorded in benchmark output)."""
    return _onednn_linear is not None


def _usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear(x, weight, bias)` may run on oneDNN (see the module docstring)."""
    if _onednn_linear is None or x.device.type != "cpu" or weight.device.type != "cpu" or weight.ndim != 2:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    if x.dtype == torch.bfloat16 and not _ONEDNN_BF16:
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.device.type != "cpu" or bias.ndim != 1):
        return False
    if x.numel() * weight.shape[0] < MIN_MACS:
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return _get_current_dispatch_mode() is None  # e.g. FlopCounterMode counts aten ops only


class _OneDNNLinear(torch.autograd.Function):
    """x @ Wᵀ + b with oneDNN in both directions (the same saved tensors as `F.linear`: x and W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad · W  =  linear(grad, Wᵀ)
            grad_x = _onednn_linear(rows, weight.t(), None, "none", [], "").reshape(x.shape)
        if ctx.needs_input_grad[1]:  # gradᵀ · x  =  linear(gradᵀ, xᵀ)
            grad_weight = _onednn_linear(rows.t(), x.reshape(-1, x.shape[-1]).t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on oneDNN on the CPU where that cannot change the result's meaning."""
    if not _usable(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_linear(x, weight, bias, "none", [], "")
