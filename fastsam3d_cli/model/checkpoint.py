"""Load and save checkpoints in every official layout — safely — and explain mismatches readably.

Layouts read (reference/models.md §2):
* ``{'model_state_dict': full}`` — SAM-Med3D turbo, and checkpoints written by this tool;
* the FastSAM3D training checkpoint (same key, plus optimizer/scheduler/args; its pickle also references
  ``argparse.Namespace``, ``collections.Counter`` and ``torch.device``);
* encoder-only dicts (distillation output) whose keys lack ``image_encoder.``;
* raw state dicts, and any of the above with DDP ``module.`` (or ``torch.compile`` ``_orig_mod.``) prefixes.

Loading never executes pickled code: ``torch.load(weights_only=True)`` with an allow-list of exactly the three
extra globals above. Anything else is refused with a clear error.
"""
from __future__ import annotations

import argparse
import collections
import functools
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.overrides import TorchFunctionMode

from fastsam3d_cli.errors import WeightsError
from fastsam3d_cli.model.config import PRESETS, ModelConfig, get_config
from fastsam3d_cli.model.cpu_runtime import tune_cpu_for_inference
from fastsam3d_cli.model.sam3d import Sam3D

# The only non-torch globals the official checkpoints pickle (FastSAM3D.pth's `args`, `used_datas`, device).
SAFE_GLOBALS: list[Any] = [argparse.Namespace, collections.Counter, torch.device]
MODULE_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_ENCODER_KEY = re.compile(r"^(pos_embed|patch_embed\.|blocks\.|neck\.)")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class CheckpointInfo:
    """What was found in a checkpoint file."""

    path: str
    layout: str  # "model_state_dict", "training", "state_dict", "raw"
    encoder_only: bool
    preset: str | None  # inferred from keys and shapes (None when nothing matches)
    extra_keys: list[str] = field(default_factory=list)  # other top-level entries (optimizer, epoch, ...)
    config: dict | None = None  # the model config stored by this tool, if any
    prior: dict | None = None  # how the model combines with the classical prior (interactive/prior.py), if trained so


# ------------------------------------------------------------------------------------------ reading
def load_payload(path: str | Path) -> Any:
    """torch.load with weights_only=True and the allow-list; WeightsError for missing/corrupt/unsafe files."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint {path} does not exist", "check the path, or see `fastsam3d weights list`")
    if path.is_dir():
        raise WeightsError(f"checkpoint {path} is a folder", "give the .pth file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return _load_mapped(path)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text and "GLOBAL" in text:
            culprit = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({culprit.group(1)})" if culprit else ""
            raise WeightsError(f"refusing to load {path}: its pickle references code that would run on load{what}",
                               "only load checkpoints from sources you trust; this file is not a plain weights file") from None
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint (corrupt or not a .pth file)",
                           "re-download it (`fastsam3d weights download NAME`) or check the path") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError) as exc:
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({_short(exc)})",
                           "re-download it (`fastsam3d weights download NAME`) or check the path") from None


def _load_mapped(path: Path) -> Any:
    """torch.load, memory-mapped where the file allows it (weights_only=True either way).

    Mapped tensors are read from the page cache on first use instead of being copied up front (a
    213 MB checkpoint: ~0.2 s less CPU per cold start, and no second copy in memory). The mapping is
    private: a tensor changed in place (training) gets its own pages and never writes to the file.
    Files in the legacy (pre-zip) format, or where mapping is not possible, are read as before.
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError) as exc:
        if "mmap" not in str(exc).lower() and not isinstance(exc, OSError):
            raise
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]


def extract_state_dict(payload: Any, path: str | Path = "<memory>", guess_preset: bool = True,
                       ) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Find the model weights in a loaded payload and normalise the keys (full `image_encoder.`-style names).

    guess_preset=False leaves `info.preset` None instead of matching the shapes of every preset (a caller that
    knows the model, or matches it itself, saves building a model per preset).
    """
    extra: list[str] = []
    config = None
    prior: Any = None
    if isinstance(payload, Mapping) and isinstance(payload.get("model_state_dict"), Mapping):
        state = payload["model_state_dict"]
        extra = [str(k) for k in payload if k != "model_state_dict"]
        layout = "training" if any(k in payload for k in ("optimizer_state_dict", "optimizer", "epoch")) \
            else "model_state_dict"
        config = payload.get("config") if isinstance(payload.get("config"), Mapping) else None
        prior = payload.get("prior")
    elif isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        state, layout = payload["state_dict"], "state_dict"
        extra = [str(k) for k in payload if k != "state_dict"]
    elif isinstance(payload, Mapping) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state, layout = payload, "raw"
    else:
        found = ", ".join(map(str, list(payload)[:8])) if isinstance(payload, Mapping) else type(payload).__name__
        raise WeightsError(f"{path} holds no model weights (found: {found or 'nothing'})",
                           "give a SAM-Med3D / FastSAM3D checkpoint (.pth)")
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry '{key}' of the state dict is not a tensor", "the file is not a model checkpoint")
        state_dict[_strip_wrappers(str(key))] = value
    encoder_only = bool(state_dict) and not any(k.startswith(MODULE_PREFIXES) for k in state_dict) \
        and all(_ENCODER_KEY.match(k) for k in state_dict)
    if encoder_only:
        state_dict = {f"image_encoder.{k}": v for k, v in state_dict.items()}
    if not state_dict or not any(k.startswith(MODULE_PREFIXES) for k in state_dict):
        raise WeightsError(f"{path} does not contain SAM-Med3D / FastSAM3D weights "
                           f"(first keys: {', '.join(list(state_dict)[:3]) or 'none'})",
                           "give a SAM-Med3D / FastSAM3D checkpoint (.pth)")
    preset = infer_preset(state_dict, encoder_only) if guess_preset else None
    info = CheckpointInfo(str(path), layout, encoder_only, preset, extra, config,
                          dict(prior) if isinstance(prior, Mapping) else prior)
    return state_dict, info


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The normalised state dict of any supported checkpoint file (WeightsError otherwise)."""
    return read_checkpoint_info(path)[0]


def read_checkpoint_info(path: str | Path, guess_preset: bool = True) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """State dict plus what layout/preset it is (preset None with guess_preset=False)."""
    return extract_state_dict(load_payload(path), path, guess_preset)


# ---------------------------------------------------------------------------------- meta models
_INIT_FUNCTIONS = {getattr(torch.nn.init, name) for name in (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_") if hasattr(torch.nn.init, name)}
_INIT_METHODS = {getattr(torch.Tensor, name) for name in (
    "uniform_", "normal_", "fill_", "zero_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_",
    "bernoulli_")}
_SCALAR_PRODUCTS = {torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul}
_RANDOM_FACTORIES = {torch.randn, torch.rand}


class _SkipMetaInit(TorchFunctionMode):
    """Skip initialising tensors on the meta device: they hold no values, and the loaded weights replace them.

    torch runs `randn`, `uniform_`/`normal_` (every Linear, Conv and Embedding init) and tensor × scalar on meta
    tensors through Python decompositions that import torch._dynamo and sympy on first use: 1.5–2 s of a cold
    `fastsam3d infer` on 2 cores, for values that are thrown away. Any other operation runs unchanged.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _RANDOM_FACTORIES:  # same shape, dtype and (meta) device; no values drawn
            empty = torch.empty(*args, **{k: v for k, v in (kwargs or {}).items() if k != "generator"})
            if empty.is_meta:
                return empty
        first = args[0] if args else (kwargs or {}).get("tensor")  # torch.nn.init passes it by keyword
        if isinstance(first, torch.Tensor) and first.is_meta:
            if func in _INIT_FUNCTIONS or func in _INIT_METHODS:
                return first
            if func in _SCALAR_PRODUCTS and len(args) == 2 and isinstance(args[1], (int, float)) \
                    and not isinstance(args[1], bool) and first.is_floating_point() and not kwargs:
                return torch.empty(first.shape, dtype=first.dtype, device=first.device)
        return func(*args, **(kwargs or {}))


def meta_model(config: ModelConfig) -> Sam3D:
    """The model for `config` on the meta device (no memory, no initialisation): shapes, or `assign=True` loads."""
    with torch.device("meta"), _SkipMetaInit():
        return Sam3D(config)


# ---------------------------------------------------------------------------------- preset matching
@functools.lru_cache(maxsize=None)
def expected_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of a preset's state dict, computed on the meta device (no memory, no init cost)."""
    return {k: tuple(v.shape) for k, v in meta_model(get_config(preset)).state_dict().items()}


def config_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    if config.name in PRESETS and PRESETS[config.name] == config:
        return expected_shapes(config.name)
    return {k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}


def infer_preset(state_dict: Mapping[str, torch.Tensor], encoder_only: bool = False) -> str | None:
    """The preset whose keys and shapes the state dict matches exactly (encoder part only if encoder_only)."""
    actual = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name in PRESETS:
        wanted = expected_shapes(name)
        if encoder_only:
            wanted = {k: s for k, s in wanted.items() if k.startswith("image_encoder.")}
        if wanted == actual:
            return name
    return None


def state_dict_diff(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]],
                    max_lines: int = 12) -> list[str]:
    """Short readable diff: missing / unexpected keys grouped by module, then wrong shapes."""
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    wrong = [k for k in expected if k in actual and tuple(expected[k]) != tuple(actual[k])]
    lines: list[str] = []
    for title, keys in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected)):
        if keys:
            lines.append(f"{title}: {len(keys)} keys")
            lines.extend(f"  {group}" for group in _group_keys(keys))
    if wrong:
        lines.append(f"wrong shape: {len(wrong)} keys")
        lines.extend(f"  {k}: checkpoint {tuple(actual[k])} vs model {tuple(expected[k])}" for k in wrong[:6])
        if len(wrong) > 6:
            lines.append(f"  … and {len(wrong) - 6} more")
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [f"… ({len(lines) - max_lines + 1} more lines)"]
    return lines


def _group_keys(keys: list[str]) -> list[str]:
    """Group keys by module: 'image_encoder.blocks.6–11 (72 keys)', 'mask_decoder.iou_token (1 key)'."""
    groups: dict[str, list[int] | None] = {}
    counts: dict[str, int] = collections.Counter()
    for key in keys:
        parts = key.split(".")
        if len(parts) > 2 and parts[2].isdigit():
            name = ".".join(parts[:2])
            groups.setdefault(name, [])
            groups[name].append(int(parts[2]))  # type: ignore[union-attr]
        else:
            name = ".".join(parts[:2]) if len(parts) > 2 else key
            groups.setdefault(name, None)
        counts[name] += 1
    out = []
    for name, indices in groups.items():
        label = name
        if indices:
            label = f"{name}.{_ranges(sorted(set(indices)))}"
        n = counts[name]
        out.append(f"{label} ({n} key{'s' if n != 1 else ''})")
    return out


def _ranges(values: list[int]) -> str:
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return "{" + ",".join(parts) + "}" if len(parts) > 1 else parts[0]


# ------------------------------------------------------------------------------------------ loading
def load_model(checkpoint: str | Path, preset: str | None = None, device: torch.device | str = "cpu",
               attention: str = "auto", decoder_checkpoint: str | Path | None = None,
               model_option: str = "--model") -> tuple[Sam3D, CheckpointInfo]:
    """Build the model for a checkpoint and load it strictly (eval mode, float32, on `device`).

    preset: expected model; None infers it from the keys and shapes. An encoder-only checkpoint needs
    `decoder_checkpoint` (a full checkpoint of any preset) for the prompt encoder and mask decoder.
    Raises WeightsError (exit 4) with a grouped key/shape diff when the file does not fit; its fix names
    `model_option`, the command-line option that chose the preset (`--teacher-model` for `distill`).
    """
    state_dict, info = read_checkpoint_info(checkpoint, guess_preset=False)  # _choose_config matches if needed
    if decoder_checkpoint is not None:
        decoder_state = read_checkpoint(decoder_checkpoint)
        for key, value in decoder_state.items():
            if not key.startswith("image_encoder."):
                state_dict.setdefault(key, value)
    elif info.encoder_only:
        raise WeightsError(f"{checkpoint} holds only an image encoder (distillation output)",
                           "also give a full checkpoint for the prompt encoder and decoder (decoder_checkpoint / "
                           "--decoder-checkpoint)")
    if any(k.startswith("projections.") for k in state_dict):  # DistillationModel's training-only layers
        raise WeightsError(f"checkpoint {checkpoint} is a `fastsam3d distill` training checkpoint (the student with "
                           "its training-only projections)",
                           f"use the run's student.pth ({Path(checkpoint).with_name('student.pth')}), written when "
                           "distill finishes")
    config = _choose_config(state_dict, info, preset, checkpoint)
    model = meta_model(config)  # built once: its shapes are the check, then it receives the weights
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected != actual:
        guess = infer_preset(state_dict)
        fix = (f"it looks like a '{guess}' checkpoint: use {model_option} {guess}" if guess and guess != config.name
               else f"check that the file is a SAM-Med3D / FastSAM3D checkpoint for this model, or name its "
                    f"model with {model_option}")
        raise WeightsError(f"checkpoint {checkpoint} does not fit model '{config.name}'", fix,
                           details=state_dict_diff(expected, actual))
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model = model.to(device).eval()
    tune_cpu_for_inference(device)
    model.set_attention(attention)
    # Read by the Predictor (interactive/prior.py), which checks it; a plain model has None.
    model.prior_settings = info.prior
    info.preset = config.name
    return model, info


def _choose_config(state_dict: Mapping[str, torch.Tensor], info: CheckpointInfo, preset: str | None,
                   path: str | Path) -> ModelConfig:
    if preset is not None:
        return get_config(preset)
    if info.config is not None:
        try:
            return ModelConfig.from_dict(dict(info.config))
        except (TypeError, ValueError):
            pass
    guess = infer_preset(state_dict)
    if guess is None:
        closest = min(PRESETS, key=lambda name: len(state_dict_diff(expected_shapes(name),
                                                                     {k: tuple(v.shape) for k, v in state_dict.items()},
                                                                     max_lines=10 ** 6)))
        raise WeightsError(f"checkpoint {path} matches none of the models ({', '.join(PRESETS)})",
                           "check that it is a SAM-Med3D / FastSAM3D checkpoint",
                           details=[f"closest: '{closest}'"] + state_dict_diff(
                               expected_shapes(closest), {k: tuple(v.shape) for k, v in state_dict.items()}))
    return get_config(guess)


# ------------------------------------------------------------------------------------------ saving
def save_checkpoint(path: str | Path, model_state_dict: Mapping[str, torch.Tensor], **extra: Any) -> None:
    """Write `{'model_state_dict': ..., **extra}` atomically — the layout the original code loads.

    Keep `extra` to tensors, numbers, strings, lists and dicts so that it loads with weights_only=True.
    """
    from fastsam3d_cli.imaging.atomic import atomic_path

    payload = {"model_state_dict": {k: v.detach().cpu() for k, v in model_state_dict.items()}, **extra}
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, str(tmp))
