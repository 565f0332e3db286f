"""Which model runs: `--model NAME` / `--checkpoint PATH` → a loaded model in eval mode, with its provenance.

Lives in `weights/` (not in `interactive/`) so the Predictor, `infer`, `serve` and `benchmark` all load a
model the same way without importing each other.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsam3d_cli.errors import UsageError, WeightsError

# --model NAME → (preset, registry name of its published weights or None)
MODEL_CHOICES: dict[str, tuple[str, str | None]] = {
    "fastsam3d": ("fastsam3d", "fastsam3d"),
    "sam-med3d": ("sam-med3d", "sam-med3d-turbo"),
    "sam-med3d-turbo": ("sam-med3d", "sam-med3d-turbo"),
    "fastsam3d-tiny": ("fastsam3d-tiny", None),
}
DEFAULT_MODEL = "fastsam3d"


@dataclass
class LoadedModel:
    """A model ready for inference and where it came from (recorded in the sidecar)."""

    model: Any  # Sam3D in eval mode
    preset: str
    checkpoint: Path
    checkpoint_sha256: str
    weights_name: str | None  # registry name when resolved by name (--model without --checkpoint)
    device: Any  # torch.device
    attention: str  # resolved backend
    load_ms: float
    dtype: str = "float32"  # weights/activation type the model runs in


def model_choice(name: str | None) -> tuple[str, str | None]:
    """(preset, registry weights name) for a --model value; UsageError for an unknown name."""
    key = (name or DEFAULT_MODEL).strip().lower()
    if key not in MODEL_CHOICES:
        raise UsageError(f"unknown model '{name}'", f"choose one of: {', '.join(MODEL_CHOICES)}")
    return MODEL_CHOICES[key]


DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """torch dtype for a --dtype value (UsageError otherwise)."""
    import torch

    if name not in DTYPES:
        raise UsageError(f"unknown --dtype '{name}'", f"choose one of: {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_inference_model(model: str | None = None, checkpoint: str | Path | None = None, device: Any = "auto",
                         attention: str = "auto", offline: bool | None = None, progress: bool = False,
                         dtype: str = "float32") -> LoadedModel:
    """Load `--checkpoint` (preset inferred unless `model` is given), or the named model's cached weights.

    dtype: "float32" (exact), or "bfloat16"/"float16" to run the model in reduced precision (bfloat16 is
    about 2–3× faster on CPUs with AVX512-BF16/AMX and on GPUs; masks can differ along outlines).

    WeightsError (exit 4): checkpoint missing, corrupt or for another preset; named weights not cached
    while offline (the message names the `fastsam3d weights download/import` command).
    """
    from fastsam3d_cli.device import resolve_device
    from fastsam3d_cli.model.checkpoint import load_model

    torch_device = device if not isinstance(device, str) else resolve_device(device)
    weights_dtype = torch_dtype(dtype)
    preset, weights_name = model_choice(model)
    start = time.perf_counter()
    if checkpoint is None:
        if weights_name is None:
            raise WeightsError(f"model '{preset}' has no published weights",
                               "give --checkpoint PATH (a checkpoint trained or distilled with fastsam3d)")
        from fastsam3d_cli.weights.cache import resolve_weights

        path = Path(resolve_weights(weights_name, offline=offline, progress=progress))
    else:
        path, weights_name = Path(checkpoint).expanduser(), None
    net, info = load_model(path, preset=preset if (model is not None or checkpoint is None) else None,
                           device=torch_device, attention=attention)
    net = net.to(weights_dtype)
    digest = sha256_cached(path)
    return LoadedModel(net, str(info.preset), path.absolute(), digest, weights_name, torch_device,
                       str(getattr(net, "attention", attention)), (time.perf_counter() - start) * 1000.0, dtype)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_cached(path: Path) -> str:
    """sha256 of a checkpoint, remembered per (path, size, mtime) within this process."""
    stat = path.stat()
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_of(path)
    return _SHA_CACHE[key]
