"""Resolve `--device auto|cpu|cuda|cuda:N` into a torch.device, failing clearly when it is absent."""
from __future__ import annotations

import re

from fastsam3d_cli.errors import DeviceError, UsageError

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str | None = "auto"):
    """Return the torch.device for `spec`; `auto` means the first CUDA device if present, else CPU."""
    import torch

    spec = (spec or "auto").strip().lower()
    if not _DEVICE_PATTERN.match(spec):
        raise UsageError(f"unknown device '{spec}'", "use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec} was asked for but CUDA is not available on this machine",
                          "use --device cpu (or auto)")
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {spec} does not exist (this machine has {torch.cuda.device_count()} CUDA device(s))",
                          "choose a valid index, or --device cuda")
    return device


def flash_attn_version() -> str | None:
    """Version of the optional flash-attn package, or None when it is not installed."""
    try:
        import flash_attn  # type: ignore[import-not-found]
    except Exception:
        return None
    return getattr(flash_attn, "__version__", "unknown")
