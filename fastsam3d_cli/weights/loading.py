"""Which model runs: `--model NAME` / `--checkpoint PATH` → a loaded model in eval mode, with its provenance.

Lives in `weights/` (not in `interactive/`) so the Predictor, `infer`, `serve` and `benchmark` all load a
model the same way without importing each other.

With neither `--model` nor `--checkpoint` the default is resolved: the published `fastsam3d` if cached,
else downloaded; when the network cannot be used (offline mode, DNS, refused, timeout) and this copy ships
a bundled model (weights/bundled.py), that one runs and one line on stderr says so. A model named
explicitly is never replaced by another.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
    fallback: dict[str, str] | None = None  # {"instead_of", "reason"} when the bundled model replaced the default


@dataclass
class ModelSource:
    """Which weights file to load, and why (resolved before anything is loaded)."""

    path: Path
    preset: str | None  # None: infer it from the file
    weights_name: str | None
    sha256: str | None = None  # known already (the bundled file is hashed by its check)
    fallback: dict[str, str] | None = None
    notice: str | None = None  # the one stderr line a fallback prints


def model_choice(name: str | None) -> tuple[str, str | None]:
    """(preset, registry weights name) for a --model value; UsageError for an unknown name.

    The bundled model (`bundled` or its own name) has no registry name: (its preset, None), or
    ("bundled", None) when this copy ships none (loading it then says so, exit 4).
    """
    from fastsam3d_cli.weights import bundled

    key = (name or DEFAULT_MODEL).strip().lower()
    if key not in MODEL_CHOICES:
        if bundled.is_bundled_name(key):
            try:
                shipped = bundled.installed()
            except WeightsError:  # damaged: loading it names the fix
                shipped = None
            return (shipped.preset if shipped else bundled.ALIAS), None
        raise UsageError(f"unknown model '{name}'", f"choose one of: {', '.join(model_names())}")
    return MODEL_CHOICES[key]


def model_names() -> list[str]:
    """Every --model value: the presets and published names, `bundled`, and the bundled model's own name."""
    from fastsam3d_cli.weights import bundled

    names = list(MODEL_CHOICES) + [bundled.ALIAS]
    try:
        model = bundled.installed()
    except WeightsError:
        model = None
    return names + ([model.name] if model is not None else [])


def resolve_model_source(model: str | None = None, checkpoint: str | Path | None = None,
                         offline: bool | None = None, progress: bool = False) -> ModelSource:
    """The weights file `--model` / `--checkpoint` (or neither: the default) stand for; see the module doc.

    WeightsError (exit 4): named weights not cached while offline or unreachable (no fallback for a name
    given explicitly), `--model bundled` where none is shipped, a bundled file that fails its sha256.
    """
    from fastsam3d_cli.weights import bundled

    if bundled.is_bundled_name(model):
        if checkpoint is not None:
            raise UsageError(f"--model {model} names the bundled weights, so --checkpoint has nothing to do",
                             "drop --checkpoint, or give a preset with --model (e.g. fastsam3d-tiny)")
        shipped = bundled.require_installed()
        path, digest = bundled.verified_path(shipped)
        return ModelSource(path, None, shipped.name, digest)  # None: the file's own config decides
    preset, weights_name = model_choice(model)
    if checkpoint is not None:
        return ModelSource(Path(checkpoint).expanduser(), preset if model is not None else None, None)
    if weights_name is None:
        raise WeightsError(f"model '{preset}' has no published weights",
                           "give --checkpoint PATH (a checkpoint trained or distilled with fastsam3d)")
    from fastsam3d_cli.weights.cache import UnreachableWeightsError, resolve_weights

    try:
        return ModelSource(Path(resolve_weights(weights_name, offline=offline, progress=progress)), preset,
                           weights_name)
    except UnreachableWeightsError as exc:
        shipped = bundled.installed() if model is None else None  # an explicit name is never substituted
        if shipped is None:
            raise
        path, digest = bundled.verified_path(shipped)
        reason = "offline mode is on" if "offline mode" in exc.message else exc.message
        notice = (f"using the bundled model '{shipped.name}' (sha256 {digest[:12]}…, a small model trained for "
                  f"offline use, see docs/models.md) because the published '{weights_name}' is not cached and "
                  f"cannot be fetched: {reason} — for the published model run `fastsam3d weights download "
                  f"{weights_name}` with internet access, or `fastsam3d weights import {weights_name} FILE`")
        return ModelSource(path, None, shipped.name, digest,
                           {"instead_of": weights_name, "reason": reason}, notice)


def bundled_file(model: str | None) -> Path | None:
    """The bundled model's checked file when `model` names it (`bundled` or its own name), else None.

    For commands that take checkpoint files (`validate`, `benchmark`): `--model bundled` stands for that file.
    WeightsError (exit 4) when none is shipped or its file fails its sha256.
    """
    from fastsam3d_cli.weights import bundled

    if not bundled.is_bundled_name(model):
        return None
    return bundled.verified_path(bundled.require_installed())[0]


def print_notice(text: str) -> None:
    """Default for `notify`: one line on stderr."""
    sys.stderr.write(f"fastsam3d: note: {text}\n")
    sys.stderr.flush()


DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """torch dtype for a --dtype value (UsageError otherwise)."""
    import torch

    if name not in DTYPES:
        raise UsageError(f"unknown --dtype '{name}'", f"choose one of: {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_inference_model(model: str | None = None, checkpoint: str | Path | None = None, device: Any = "auto",
                         attention: str = "auto", offline: bool | None = None, progress: bool = False,
                         dtype: str = "float32", notify: Callable[[str], None] | None = None) -> LoadedModel:
    """Load `--checkpoint` (preset inferred unless `model` is given), the named model's weights, or the default
    (`model` and `checkpoint` None: published `fastsam3d`, else the bundled model when offline/unreachable).

    dtype: "float32" (exact), or "bfloat16"/"float16" to run the model in reduced precision (bfloat16 is
    about 2–3× faster on CPUs with AVX512-BF16/AMX and on GPUs; masks can differ along outlines).
    notify: receives the one-line notice when the bundled model replaces the default (default: stderr).

    WeightsError (exit 4): checkpoint missing, corrupt or for another preset; named weights not cached
    while offline (the message names the `fastsam3d weights download/import` command).
    """
    from fastsam3d_cli.device import resolve_device
    from fastsam3d_cli.model.checkpoint import load_model
    from fastsam3d_cli.model.refine_head import use_inference_layout

    torch_device = device if not isinstance(device, str) else resolve_device(device)
    weights_dtype = torch_dtype(dtype)
    start = time.perf_counter()
    source = resolve_model_source(model, checkpoint, offline=offline, progress=progress)
    net, info = load_model(source.path, preset=source.preset, device=torch_device, attention=attention)
    net = net.to(weights_dtype)
    use_inference_layout(net)
    digest = source.sha256 or sha256_cached(source.path)
    if source.notice:
        (notify or print_notice)(source.notice)
    return LoadedModel(net, str(info.preset), source.path.absolute(), digest, source.weights_name, torch_device,
                       str(getattr(net, "attention", attention)), (time.perf_counter() - start) * 1000.0, dtype,
                       source.fallback)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file (the cache's chunked hasher; one implementation for every weights/input digest)."""
    from fastsam3d_cli.weights.cache import _hash_file

    return _hash_file(path)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_cached(path: Path) -> str:
    """sha256 of a checkpoint, remembered per (path, size, mtime) within this process; a cached weights file
    that `resolve_weights` has just verified is not hashed again."""
    from fastsam3d_cli.weights.cache import take_prehashed, verified_sha256

    stat = path.stat()
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = verified_sha256(path) or take_prehashed(path) or sha256_of(path)
    return _SHA_CACHE[key]


def start_hashing_weights(model: str | None = None, checkpoint: str | Path | None = None) -> None:
    """Begin hashing, in a background thread, the weights file that loading (`model`, `checkpoint`) will hash:
    the checkpoint, or the named model's cached file. Called first thing by the CLI so the hash overlaps the
    torch import (cache.start_hashing); a name or file that does not resolve is left to the load to report."""
    from fastsam3d_cli.weights import cache

    try:
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
        else:
            weights_name = model_choice(model)[1]
            if weights_name is None:
                return
            path = cache.cache_dir() / cache.get_spec(weights_name).filename
        if path.is_file():
            cache.start_hashing(path)
    except Exception:  # noqa: BLE001 - only a head start; every error is reported by the load itself
        return
