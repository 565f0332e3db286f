"""Reading nnU-Net raw datasets (v1 `TaskNNN_*` and v2 `DatasetNNN_*`): format, label map, cases.

Only the raw layout is read here (no voxel data): `dataset.json` is validated, the format is detected
from its keys (never from the folder name), the label map is turned into binary classes (a v2 region,
a list of values, becomes one class `isin(label, values)`; background 0 and the v2 `ignore` label are
never classes), and the training cases are discovered with nnU-Net's own rules:

* v1: the `training` list; its image paths omit the channel suffix, so the exact path is tried first
  (a raw MSD 4D file) and then `<stem>_XXXX.nii.gz` (an nnU-Net-formatted task).
* v2: the optional `dataset` mapping (relative paths are relative to the dataset folder, `$VARS`
  expanded) replaces folder scanning; otherwise `imagesTr/CASE_XXXX<file_ending>` with the label at
  `labelsTr/CASE<file_ending>`.

Every problem a user can cause is a one-line `BadInputError` naming the dataset (and case).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastsam3d_cli.errors import BadInputError

NnunetFormat = Literal["v1", "v2"]

DATASET_JSON = "dataset.json"
V1_REQUIRED_KEYS = ("modality", "labels", "training")
V2_REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
V1_FILE_ENDING = ".nii.gz"
IGNORE_LABEL_NAME = "ignore"  # nnU-Net v2's reserved name for "not annotated" voxels


@dataclass(frozen=True)
class LabelClass:
    """One binary training class: voxels whose label value is in `values`.

    `name` is the dataset's spelling with whitespace replaced by `_` (used as a folder name);
    `source_name` is the spelling in `dataset.json`. A v2 region has several values.
    """

    name: str
    source_name: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class LabelMap:
    """The label definitions of a dataset: classes, every value a label file may contain, ignore value."""

    classes: tuple[LabelClass, ...]
    allowed_values: frozenset[int]
    ignore_value: int | None


@dataclass(frozen=True)
class RawCase:
    """One training case. `image_path` holds the chosen channel; `channel_in_file` is the index to pick
    inside a 4D file (v1 raw MSD), or None for a single-channel 3D file. `channel_per_file`: the dataset
    keeps one channel per file (`CASE_0000`, `CASE_0001`, …), so `--channel` picks a file, never a channel
    inside one, and a 4D file there is a malformed dataset rather than a missing option."""

    case_id: str
    image_path: Path
    label_path: Path
    channel_in_file: int | None
    channel_per_file: bool = True


@dataclass(frozen=True)
class RawDataset:
    """A validated nnU-Net raw dataset, ready to be prepared (no voxels read yet)."""

    root: Path
    name: str  # the folder name, used as <dataset> in the prepared layout
    format: NnunetFormat
    channel: int  # which channel (modality) is used
    channel_names: tuple[str, ...]
    labels: LabelMap
    cases: tuple[RawCase, ...]
    dataset_json_sha256: str
    warnings: tuple[str, ...] = ()

    @property
    def modality(self) -> str:
        """The chosen channel's name, whitespace → `_` (the <modality> of the prepared layout)."""
        return sanitize_name(self.channel_names[self.channel])

    @property
    def classes(self) -> tuple[LabelClass, ...]:
        return self.labels.classes


# ------------------------------------------------------------------------------------ dataset.json
def sanitize_name(name: str) -> str:
    """Dataset spelling kept, whitespace replaced by `_` (so it can be a folder name)."""
    return re.sub(r"\s", "_", name.strip())


def read_dataset_json(root: Path) -> tuple[dict[str, Any], str]:
    """Parse `<root>/dataset.json`; return it and the SHA-256 of its bytes."""
    root = Path(root)
    if not root.exists():
        raise BadInputError(f"dataset folder {root} does not exist", "check the path")
    if not root.is_dir():
        raise BadInputError(f"{root} is not a folder", "give an nnU-Net raw dataset folder (with dataset.json)")
    path = root / DATASET_JSON
    if not path.is_file():
        raise BadInputError(f"{root} has no {DATASET_JSON}",
                            "give an nnU-Net raw dataset folder (DatasetNNN_Name or TaskNNN_Name) "
                            "containing dataset.json")
    raw = path.read_bytes()
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise BadInputError(f"{path} is not valid JSON{where}: {getattr(exc, 'msg', exc)}",
                            "fix the file (a JSON object as nnU-Net writes it)") from None
    if not isinstance(meta, dict):
        raise BadInputError(f"{path} is not a JSON object", "fix the file (a JSON object as nnU-Net writes it)")
    return meta, hashlib.sha256(raw).hexdigest()


def detect_format(meta: dict[str, Any], path: Path) -> NnunetFormat:
    """v1 or v2 from the keys and label map of dataset.json (the folder prefix is never trusted).

    v2: `channel_names`/`file_ending`, or label values that are ints/lists. v1: `modality`/`training`,
    or label keys that are integer strings mapping to names. The label map decides when keys disagree.
    """
    labels = meta.get("labels")
    if isinstance(labels, dict) and labels:
        if all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in labels.values()):
            return "v2"
        if all(_is_int_string(k) and isinstance(v, str) for k, v in labels.items()):
            return "v1"
    v2_keys = any(k in meta for k in ("channel_names", "file_ending"))
    v1_keys = any(k in meta for k in ("modality", "training"))
    if v2_keys and not v1_keys:
        return "v2"
    if v1_keys and not v2_keys:
        return "v1"
    if not v1_keys and not v2_keys:
        raise BadInputError(
            f"{path} is neither nnU-Net v1 nor v2: missing keys {', '.join(V2_REQUIRED_KEYS)} (v2) "
            f"or {', '.join(V1_REQUIRED_KEYS)} (v1)",
            "write a dataset.json as nnU-Net describes (see nnunetv2/dataset_conversion)")
    raise BadInputError(f"{path} mixes nnU-Net v1 and v2 keys and its 'labels' does not decide",
                        "use v2 labels (name → int) with channel_names, or v1 labels (\"1\": name) with modality")


def _is_int_string(key: Any) -> bool:
    return isinstance(key, str) and re.fullmatch(r"\d+", key.strip()) is not None


def _require_keys(meta: dict[str, Any], required: tuple[str, ...], path: Path, fmt: NnunetFormat) -> None:
    missing = [k for k in required if k not in meta]
    if missing:
        raise BadInputError(f"{path} (nnU-Net {fmt}) is missing required key(s): {', '.join(missing)}",
                            f"add them; nnU-Net {fmt} needs {', '.join(required)}")


def _channel_names(meta: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    """`{"0": "CT", "1": "ADC"}` → ("CT", "ADC"), checking that indices are 0..n-1."""
    value = meta[key]
    if not isinstance(value, dict) or not value:
        raise BadInputError(f"{path}: '{key}' must be a non-empty object like {{\"0\": \"CT\"}}", "fix dataset.json")
    if not all(_is_int_string(k) and isinstance(v, str) and v.strip() for k, v in value.items()):
        raise BadInputError(f"{path}: '{key}' must map channel numbers to names, like {{\"0\": \"CT\"}}",
                            "fix dataset.json")
    by_index = {int(k): v for k, v in value.items()}
    if sorted(by_index) != list(range(len(by_index))):
        raise BadInputError(f"{path}: '{key}' channels must be numbered 0..{len(by_index) - 1}, got {sorted(by_index)}",
                            "fix dataset.json")
    return tuple(by_index[i] for i in range(len(by_index)))


# ------------------------------------------------------------------------------------------- labels
def parse_labels(meta: dict[str, Any], fmt: NnunetFormat, path: Path) -> LabelMap:
    """Turn `labels` into binary classes.

    v1: `{"0": "background", "1": "liver"}`. v2: `{"background": 0, "liver": 1, "tumor_core": [2, 3],
    "ignore": 4}`; a list is a region (one class over several values), `ignore` is never a class.
    Background (value 0) is never a class.
    """
    labels = meta["labels"]
    if not isinstance(labels, dict) or not labels:
        raise BadInputError(f"{path}: 'labels' must be a non-empty object", "fix dataset.json")
    named_values = _v1_named_values(labels, path) if fmt == "v1" else _v2_named_values(labels, path)
    ignore_value = None
    if fmt == "v2" and IGNORE_LABEL_NAME in labels:
        ignore = labels[IGNORE_LABEL_NAME]
        if not isinstance(ignore, int) or isinstance(ignore, bool):
            raise BadInputError(f"{path}: the 'ignore' label must be a single integer, got {ignore!r}",
                                "give it the highest label value, as nnU-Net requires")
        ignore_value = ignore
    allowed = {v for _, values in named_values for v in values}
    if 0 not in allowed:
        raise BadInputError(f"{path}: 'labels' has no background (value 0)",
                            "add \"background\": 0 (v2) or \"0\": \"background\" (v1)")
    classes: list[LabelClass] = []
    seen: dict[str, str] = {}
    for source_name, values in named_values:
        if values == (0,) or source_name == IGNORE_LABEL_NAME and fmt == "v2":
            continue
        if 0 in values:
            raise BadInputError(f"{path}: label '{source_name}' includes the background value 0",
                                "regions may only combine foreground values")
        name = sanitize_name(source_name)
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise BadInputError(f"{path}: label name {source_name!r} cannot be used as a folder name",
                                "rename the label in dataset.json")
        if name in seen:
            raise BadInputError(f"{path}: labels {seen[name]!r} and {source_name!r} both become class '{name}'",
                                "rename one of them in dataset.json")
        seen[name] = source_name
        classes.append(LabelClass(name=name, source_name=source_name, values=values))
    return LabelMap(classes=tuple(classes), allowed_values=frozenset(allowed), ignore_value=ignore_value)


def _v1_named_values(labels: dict[str, Any], path: Path) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for key, name in labels.items():
        if not _is_int_string(key) or not isinstance(name, str):
            raise BadInputError(f"{path}: v1 'labels' must map value strings to names (\"1\": \"liver\"), "
                                f"got {key!r}: {name!r}",
                                "fix dataset.json")
        out.append((name, (int(key),)))
    return out


def _v2_named_values(labels: dict[str, Any], path: Path) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise BadInputError(f"{path}: label {name!r} must be a non-negative integer or a list of them "
                                f"(a region), got {value!r}",
                                "fix dataset.json")
        out.append((name, tuple(sorted(set(values)))))
    return out


# -------------------------------------------------------------------------------------------- cases
def discover_cases_v1(root: Path, meta: dict[str, Any], channel: int, path: Path,
                      requested_channel: int | None = None) -> list[RawCase]:
    """Cases from the v1 `training` list, resolving the `_0000` trap (exact path, then `<stem>_XXXX`).

    An existing exact path may be a raw-MSD 4D file: it is read with `requested_channel` (the user's
    --channel, None when not given, so that a 4D file without --channel is reported, not guessed).
    """
    training = meta["training"]
    if not isinstance(training, list):
        raise BadInputError(f"{path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}}",
                            "fix dataset.json")
    cases = []
    for number, item in enumerate(training):
        if not (isinstance(item, dict) and isinstance(item.get("image"), str) and isinstance(item.get("label"), str)):
            raise BadInputError(f"{path}: training entry {number} must have string 'image' and 'label'",
                                "fix dataset.json")
        listed_image = _resolve(root, item["image"])
        case_id = _strip_ending(listed_image.name)
        label = _resolve(root, item["label"])
        if listed_image.is_file():
            image, channel_in_file = listed_image, requested_channel  # raw MSD: possibly a 4D file
        else:
            image = listed_image.with_name(f"{case_id}_{channel:04d}{_ending_of(listed_image.name)}")
            channel_in_file = None
            if not image.exists():
                raise BadInputError(f"{root.name} case {case_id}: image not found: "
                                    f"neither {listed_image} nor {image} exists",
                                    "check imagesTr (nnU-Net names channel files CASE_0000.nii.gz)")
        cases.append(RawCase(case_id, image, label, channel_in_file, channel_per_file=image != listed_image))
    return cases


def discover_cases_v2(root: Path, meta: dict[str, Any], channel: int, path: Path) -> list[RawCase]:
    """Cases from the v2 `dataset` mapping when present, else from `imagesTr` names."""
    ending = meta["file_ending"]
    if "dataset" in meta:
        return _cases_from_mapping(root, meta["dataset"], channel, path)
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise BadInputError(f"{root} has no imagesTr folder (and dataset.json has no 'dataset' mapping)",
                            "put the training images in imagesTr/CASE_0000" + ending)
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    files: dict[str, dict[int, Path]] = {}
    for file in sorted(images_dir.iterdir()):
        if file.name.startswith(".") or not file.name.endswith(ending):
            continue
        match = pattern.match(file.name)
        if match is None:
            raise BadInputError(f"{file} does not follow nnU-Net's CASE_XXXX{ending} naming",
                                f"rename it (channel 0 of case CASE is CASE_0000{ending})")
        files.setdefault(match["case"], {})[int(match["channel"])] = file
    cases = []
    for case_id, channels in files.items():
        if channel not in channels:
            raise BadInputError(f"{root.name} case {case_id}: no image for channel {channel} "
                                f"(expected {images_dir / f'{case_id}_{channel:04d}{ending}'})",
                                "add the file or choose another --channel")
        cases.append(RawCase(case_id, channels[channel], root / "labelsTr" / f"{case_id}{ending}", None))
    return cases


def _cases_from_mapping(root: Path, mapping: Any, channel: int, path: Path) -> list[RawCase]:
    if not isinstance(mapping, dict):
        raise BadInputError(f"{path}: 'dataset' must map case ids to {{\"images\": [...], \"label\": ...}}",
                            "fix dataset.json")
    cases = []
    for case_id, item in mapping.items():
        images = item.get("images") if isinstance(item, dict) else None
        label = item.get("label") if isinstance(item, dict) else None
        valid_images = isinstance(images, list) and images and all(isinstance(i, str) for i in images)
        if not (valid_images and isinstance(label, str)):
            raise BadInputError(f"{path}: 'dataset' entry {case_id!r} needs 'images' (a list of paths) "
                                "and 'label' (a path)",
                                "fix dataset.json")
        if channel >= len(images):
            raise BadInputError(f"{root.name} case {case_id}: 'dataset' lists {len(images)} image(s), "
                                f"so channel {channel} does not exist",
                                "choose another --channel")
        cases.append(RawCase(str(case_id), _resolve(root, images[channel]), _resolve(root, label), None))
    return cases


def _resolve(root: Path, listed: str) -> Path:
    """nnU-Net's rule: expand `$VARS`, then relative paths are relative to the dataset folder."""
    expanded = os.path.expandvars(listed)
    candidate = Path(expanded)
    return candidate if candidate.is_absolute() else Path(os.path.normpath(root / candidate))


def _ending_of(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _strip_ending(name: str) -> str:
    ending = _ending_of(name)
    return name[: -len(ending)] if ending else name


def check_case_files(dataset_name: str, case: RawCase) -> None:
    """Missing or empty image/label file → one clear line naming the case (unset `$VARS` explained)."""
    for what, file in (("image", case.image_path), ("label", case.label_path)):
        if not file.exists():
            hint = "check the path"
            unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", str(file))
            if unset:
                hint = f"environment variable {unset[0]} is not set; set it or fix the path in dataset.json"
            raise BadInputError(f"{dataset_name} case {case.case_id}: {what} file {file} does not exist", hint)
        if not file.is_file():
            raise BadInputError(f"{dataset_name} case {case.case_id}: {what} {file} is not a file", "check the path")
        if file.stat().st_size == 0:
            raise BadInputError(f"{dataset_name} case {case.case_id}: {what} file {file} is empty",
                                "re-export or re-copy it")


# ---------------------------------------------------------------------------------------- top level
def load_raw_dataset(root: Path, channel: int | None = None) -> RawDataset:
    """Validate `root` as an nnU-Net v1/v2 raw dataset and list its training cases (sorted by id).

    `channel` picks the modality; None means 0 and is only allowed for single-channel datasets.
    Raises `BadInputError` for anything unusable (missing/invalid dataset.json, missing keys, missing
    or empty case files, duplicate cases, an unknown channel).
    """
    root = Path(root).expanduser().absolute()
    meta, sha = read_dataset_json(root)
    path = root / DATASET_JSON
    fmt = detect_format(meta, path)
    _require_keys(meta, V1_REQUIRED_KEYS if fmt == "v1" else V2_REQUIRED_KEYS, path, fmt)
    channel_names = _channel_names(meta, "modality" if fmt == "v1" else "channel_names", path)
    chosen = _choose_channel(root.name, channel_names, channel)
    labels = parse_labels(meta, fmt, path)
    if fmt == "v1":
        cases = discover_cases_v1(root, meta, chosen, path, requested_channel=channel)
    else:
        ending = meta["file_ending"]
        if not isinstance(ending, str) or not ending.startswith("."):
            raise BadInputError(f"{path}: 'file_ending' must be a string like \".nii.gz\", got {ending!r}",
                                "fix dataset.json")
        cases = discover_cases_v2(root, meta, chosen, path)
    if not cases:
        raise BadInputError(f"dataset {root.name} has no training cases",
                            "put images in imagesTr and labels in labelsTr")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise BadInputError(f"dataset {root.name} lists case(s) {', '.join(duplicates)} more than once",
                            "fix dataset.json")
    for case in cases:
        check_case_files(root.name, case)
    warnings = []
    declared = meta.get("numTraining")
    if isinstance(declared, int) and declared != len(cases):
        warnings.append(f"{root.name}: dataset.json says numTraining={declared} but {len(cases)} case(s) were found")
    return RawDataset(root=root, name=root.name, format=fmt, channel=chosen, channel_names=channel_names,
                      labels=labels, cases=tuple(sorted(cases, key=lambda c: c.case_id)),
                      dataset_json_sha256=sha, warnings=tuple(warnings))


def _choose_channel(dataset: str, channel_names: tuple[str, ...], channel: int | None) -> int:
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(channel_names))
    if channel is None:
        if len(channel_names) > 1:
            raise BadInputError(f"dataset {dataset} has {len(channel_names)} channels ({listing})",
                                "choose one with --channel N")
        return 0
    if not 0 <= channel < len(channel_names):
        raise BadInputError(f"--channel {channel} does not exist in dataset {dataset} (channels: {listing})",
                            f"use a channel from 0 to {len(channel_names) - 1}")
    return channel
