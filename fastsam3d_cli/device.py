"""Resolve `--device auto|cpu|cuda|cuda:N` into a torch.device, failing clearly when it is absent."""
from __future__ import annotations

import re

from fastsam3d_cli.errors import DeviceError, UsageError

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_spec(spec: str | None) -> None:
    """UsageError for a --device value that is not auto, cpu, cuda or cuda:N — checked before any other work,
    so a typo is reported as the usage error it is (exit 2), not after an output or model check."""
    text = (spec or "auto").strip().lower()
    if not _DEVICE_PATTERN.match(text):
        raise UsageError(f"unknown device '{text}'", "use auto, cpu, cuda or cuda:N")


def check_attention_name(name: str, allowed: tuple[str, ...] | None = None) -> None:
    """UsageError for an unknown --attention value, before the model is loaded (no torch import needed)."""
    choices = allowed or ATTENTION_BACKENDS
    if name not in choices:
        raise UsageError(f"unknown attention backend '{name}'", f"choose one of: {', '.join(choices)}")


ATTENTION_BACKENDS = ("auto", "exact", "sdpa", "flash", "sparse")  # model/attention.py BACKENDS (a test keeps them equal)


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
