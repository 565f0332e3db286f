"""Dense layers (x @ Wᵀ + b) for CPU inference, on oneDNN instead of the BLAS behind `torch.addmm`.

Why: PyTorch's CPU wheels run float32 `addmm`/`F.linear` on Intel MKL, which on AMD CPUs takes a generic
AVX2 code path. oneDNN (bundled in the same wheel) picks its kernels by the instructions the CPU has.
Measured on the 2-core AMD EPYC (Zen 5, AVX-512) these tools are benchmarked on: 187–217 GFLOP/s for MKL
and 464–484 GFLOP/s for oneDNN on the encoder's shapes, with float32 arithmetic (max error against a
float64 product 1.2e-4 vs 5.4e-5 for MKL, on a 768-long dot product of unit normals; bfloat16: 0.54).

Used only where it cannot change what a caller sees: CPU tensors, no autograd graph being recorded, no
autocast, no tracing or dispatch mode (FLOP counting sees plain aten ops), at least `MIN_MACS` multiply-adds
(smaller products are faster on MKL). Everything else calls `F.linear`.
`FASTSAM3D_CPU_GEMM=aten` turns it off for the process (read once, at import).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
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


def uses_onednn() -> bool:
    """Whether CPU inference GEMMs run on oneDNN in this process (recorded in benchmark output)."""
    return _onednn_linear is not None


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear(x, weight, bias)` may take the oneDNN op (see the module docstring)."""
    if _onednn_linear is None or x.device.type != "cpu" or weight.device.type != "cpu" or weight.ndim != 2:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.device.type != "cpu"):
        return False
    if x.numel() * weight.shape[0] < MIN_MACS:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False  # training: keep aten's autograd formula
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return _get_current_dispatch_mode() is None  # e.g. FlopCounterMode counts aten ops only


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; on oneDNN for CPU inference (see the module docstring)."""
    if _eligible(x, weight, bias):
        return _onednn_linear(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
