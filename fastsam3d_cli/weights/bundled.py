"""The bundled model: small float16 weights shipped inside the package, so `infer` works on a machine that
cannot download the published checkpoint.

The folder `fastsam3d_cli/weights/bundled/` (package data) holds at most one model:

    manifest.json   name, preset + model config, file, dtype, size, sha256, training provenance
    <name>.pt       {'model_state_dict': float16 tensors (official key layout), 'config': ..., 'preset': ...}

Nothing is installed until a release ships the two files; then `installed()` describes them, and every load
re-checks the file's sha256 against the manifest (a mismatch is exit 4: reinstall). `export_bundled` writes
both files from a training checkpoint (`fastsam3d weights bundle`). Tests point `BUNDLED_DIR` elsewhere.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from fastsam3d_cli.errors import BadInputError, UsageError, WeightsError

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"  # module-level so tests can point it elsewhere
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
ALIAS = "bundled"  # `--model bundled` selects the bundled model whatever its name
DEFAULT_NAME = "fastsam3d-bundled"
MAX_BYTES = 40_000_000  # the shipped weights file stays under 40 MB (package size)
FLOAT16_MAX = 65504.0
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
REINSTALL_FIX = ("reinstall fastsam3d-cli to restore it (`pip install --force-reinstall --no-deps fastsam3d-cli`; "
                 "in a git checkout `git checkout -- fastsam3d_cli/weights/bundled` and `pip install -e .`)")


@dataclass(frozen=True)
class BundledModel:
    """What the manifest says about the bundled weights (the file itself is checked by `verified_path`)."""

    name: str
    preset: str
    config: dict[str, Any]
    path: Path
    sha256: str
    size_bytes: int
    dtype: str = "float16"
    provenance: dict[str, Any] = field(default_factory=dict)
    created_utc: str | None = None
    prior: dict[str, Any] | None = None  # the classical prior the model corrects (interactive/prior.py), if any

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (what `weights list --json` shows under "bundled")."""
        return {"name": self.name, "alias": ALIAS, "preset": self.preset, "path": str(self.path),
                "sha256": self.sha256, "size_bytes": self.size_bytes, "dtype": self.dtype,
                "created_utc": self.created_utc, "prior": self.prior, "provenance": self.provenance}


def manifest_path(folder: Path | None = None) -> Path:
    return Path(folder if folder is not None else BUNDLED_DIR) / MANIFEST_NAME


def installed(folder: Path | None = None) -> BundledModel | None:
    """The bundled model this copy ships, or None when it ships none (no manifest).

    WeightsError (reinstall) when a manifest is there but unreadable, incomplete, or its weights file is
    missing: a damaged installation never passes for "nothing bundled".
    """
    path = manifest_path(folder)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = BundledModel(
            name=str(data["name"]), preset=str(data["preset"]), config=dict(data["config"]),
            path=path.parent / Path(str(data["file"])).name, sha256=str(data["sha256"]).lower(),
            size_bytes=int(data["size_bytes"]), dtype=str(data.get("dtype", "float16")),
            provenance=dict(data.get("provenance") or {}), created_utc=data.get("created_utc"),
            prior=dict(data["prior"]) if data.get("prior") else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"the bundled model's manifest {path} is unreadable ({type(exc).__name__})",
                           REINSTALL_FIX) from None
    if not model.path.is_file():
        raise WeightsError(f"the bundled model '{model.name}' is incomplete: {model.path} is missing", REINSTALL_FIX)
    return model


def is_bundled_name(name: str | None, folder: Path | None = None) -> bool:
    """True for `bundled` and for the installed bundled model's own name (case-insensitive)."""
    if name is None:
        return False
    key = name.strip().lower()
    if key == ALIAS:
        return True
    try:
        model = installed(folder)
    except WeightsError:  # a damaged bundle must not block the other names; loading it reports the damage
        return False
    return model is not None and key == model.name.lower()


def require_installed(folder: Path | None = None) -> BundledModel:
    """The bundled model; WeightsError when this copy ships none (`--model bundled` asked for it)."""
    model = installed(folder)
    if model is None:
        raise WeightsError("this installation ships no bundled model",
                           "use the published weights (`--model fastsam3d`, `fastsam3d weights download fastsam3d`) "
                           "or give --checkpoint PATH")
    return model


def file_sha256(model: BundledModel) -> str:
    from fastsam3d_cli.weights.cache import sha256_file

    return sha256_file(model.path)


def verified_path(model: BundledModel) -> tuple[Path, str]:
    """(path, sha256) of the bundled weights after checking the file against the manifest (WeightsError:
    reinstall). Checked on every load: a damaged file must never run as the default model."""
    digest = file_sha256(model)
    check_digest(model, digest)
    return model.path, digest


def check_digest(model: BundledModel, digest: str | None) -> None:
    """WeightsError (reinstall) when `digest`, the bundled file's sha256, is not the manifest's."""
    if digest != model.sha256:
        raise WeightsError(f"the bundled model '{model.name}' ({model.path}) fails its sha256 check: {digest} != "
                           f"{model.sha256} in {MANIFEST_NAME}", REINSTALL_FIX)


# ------------------------------------------------------------------------------------------ export
def check_name(name: str) -> str:
    """A bundled model's name: lower-case, not a name `--model` already means (UsageError otherwise)."""
    from fastsam3d_cli.model.config import PRESET_NAMES
    from fastsam3d_cli.weights.cache import BUILTIN_REGISTRY

    if not _NAME_PATTERN.match(name):
        raise UsageError(f"--name {name!r} is not a valid bundled model name",
                         "use lower-case letters, digits, '.', '_' or '-' (e.g. fastsam3d-bundled)")
    taken = set(BUILTIN_REGISTRY) | set(PRESET_NAMES) | {ALIAS}
    if name in taken:
        raise UsageError(f"--name {name} is already a model name", f"choose another name (not {', '.join(sorted(taken))})")
    return name


def to_float16(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Floating tensors as float16 (others unchanged); WeightsError if a value does not fit float16's range."""
    import torch

    converted = {}
    for key, value in state_dict.items():
        if value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                raise WeightsError(f"weight {key} holds inf or NaN", "the checkpoint is broken; bundle another one")
            peak = float(value.abs().max()) if value.numel() else 0.0
            if peak > FLOAT16_MAX:
                raise WeightsError(f"weight {key} reaches {peak:.4g}, beyond float16's range",
                                   "bundle a checkpoint whose weights stay within ±65504")
            value = value.detach().to(torch.float16)
        converted[key] = value.detach().cpu().contiguous()
    return converted


def _training_provenance(payload: Any) -> dict[str, Any]:
    """What a `train`/`distill` checkpoint says about how it was made (steps, epochs, seed, arguments)."""
    if not isinstance(payload, Mapping):
        return {}
    args = payload.get("args") if isinstance(payload.get("args"), Mapping) else {}
    found = {"fastsam3d_version": payload.get("fastsam3d_version"), "task": payload.get("task"),
             "steps": payload.get("global_step"), "epochs": payload.get("epoch"), "seed": args.get("seed"),
             "saved_utc": payload.get("saved_at"), "training_args": dict(args) or None,
             "data": payload.get("data"), "best": payload.get("best"), "distillation": payload.get("distillation")}
    return {k: _json_ready(v) for k, v in found.items() if v is not None}


def _json_ready(value: Any) -> Any:
    """Plain JSON types only (tensors and other objects become their str)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def export_bundled(checkpoint: str | Path, *, name: str = DEFAULT_NAME, output_dir: str | Path | None = None,
                   commands: Sequence[str] = (), cpu_hours: float | None = None, notes: str | None = None,
                   provenance: Mapping[str, Any] | None = None, overwrite: bool = False) -> BundledModel:
    """Convert a full checkpoint (any supported layout) into the bundled float16 weights + manifest.

    The checkpoint must load strictly into its preset (or its stored config). Writes `<name>.pt` and
    `manifest.json` into `output_dir` (default: the package's bundled folder) together, atomically; a
    manifest already there is only replaced with `overwrite` (its old weights file is then deleted).
    Provenance = what the checkpoint records (steps, epochs, seed, arguments, data) + `provenance` (a
    mapping, e.g. from a JSON file) + `commands`, `cpu_hours`, `notes`.
    """
    from fastsam3d_cli.model.checkpoint import load_model, load_payload
    from fastsam3d_cli.weights.cache import sha256_file

    check_name(name)
    if cpu_hours is not None and not cpu_hours >= 0:
        raise UsageError(f"--cpu-hours {cpu_hours} is invalid", "give the training time in CPU-hours, 0 or more")
    folder = Path(output_dir if output_dir is not None else BUNDLED_DIR).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"output folder {folder} is a file", "give a folder with --output-dir")
    if manifest_path(folder).exists() and not overwrite:
        raise BadInputError(f"{manifest_path(folder)} already exists (a bundled model is there)",
                            "pass --overwrite to replace it")
    try:
        previous = installed(folder)
    except WeightsError:  # a damaged earlier bundle is simply replaced
        previous = None
    source = Path(checkpoint).expanduser()
    model, info = load_model(source, device="cpu", attention="exact")  # strict; an encoder-only file is refused
    state = to_float16(model.state_dict())
    config = model.config.to_dict()
    recorded = {**_training_provenance(load_payload(source)), **_json_ready(dict(provenance or {}))}
    if commands:
        recorded["commands"] = list(commands)
    if cpu_hours is not None:
        recorded["cpu_hours"] = float(cpu_hours)
    if notes:
        recorded["notes"] = notes
    recorded["source_checkpoint"] = {"file": source.name, "sha256": sha256_file(source), "layout": info.layout}
    weights_file = f"{name}.pt"
    created = not folder.exists()
    try:
        _write_bundle(folder, weights_file, state, config, model.config.name, name, recorded, source,
                      info.prior)
    except BaseException:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # nothing left behind, not even the folder this call made
        raise
    if previous is not None and previous.path.name != weights_file:
        previous.path.unlink(missing_ok=True)
    result = installed(folder)
    assert result is not None
    return result


def _write_bundle(folder: Path, weights_file: str, state: Mapping[str, Any], config: dict[str, Any], preset: str,
                  name: str, provenance: dict[str, Any], source: Path, prior: dict[str, Any] | None = None) -> None:
    """Write `<name>.pt` and manifest.json together (atomic group): both appear, or neither."""
    import torch

    from fastsam3d_cli.imaging.atomic import atomic_group
    from fastsam3d_cli.model.checkpoint import load_model
    from fastsam3d_cli.weights.cache import sha256_file

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_group() as group:
            tmp = group.path(folder / weights_file)
            payload: dict[str, Any] = {"model_state_dict": state, "config": config, "preset": preset}
            if prior is not None:
                payload["prior"] = dict(prior)  # the model corrects the classical prior (interactive/prior.py)
            torch.save(payload, str(tmp))
            size = tmp.stat().st_size
            if size > MAX_BYTES:
                raise BadInputError(f"the float16 weights of {source} take {size / 1e6:.1f} MB, over the "
                                    f"{MAX_BYTES / 1e6:.0f} MB a bundled model may take",
                                    "bundle a smaller model (e.g. the fastsam3d-tiny preset)")
            load_model(tmp, device="cpu", attention="exact")  # the float16 file loads back into its model
            manifest = {"format": MANIFEST_FORMAT, "name": name, "preset": preset, "config": config,
                        "file": weights_file, "dtype": "float16", "size_bytes": size, "sha256": sha256_file(tmp),
                        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "prior": prior, "provenance": provenance}
            group.path(manifest_path(folder)).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise BadInputError(f"cannot write the bundled model into {folder} ({exc.strerror or exc})",
                            "choose a writable --output-dir") from None

