"""Reading a prepared folder (what `fastsam3d prepare` writes) for `train`, `distill` and `validate`.

Layout (SAM-Med3D / FastSAM3D's training layout)::

    PREPARED_DIR/<class>/<modality>_<dataset>/imagesTr/<case>.nii.gz   image at the prepared spacing
                                             /labelsTr/<case>.nii.gz   binary uint8 {0, 1}: 1 = this class
                                             /ignoreTr/<case>.nii.gz   only for datasets with an nnU-Net v2
                                                                        `ignore` label: uint8 {0, 1}, 1 = not
                                                                        annotated (exclude from loss/clicks)
    PREPARED_DIR/manifest.json                      every (case, class) written or skipped, and why
    PREPARED_DIR/manifest.shard-K-of-N.json         partial manifests of `--shard K/N` runs

The manifest is the source of truth: `list_prepared_samples` reads `manifest.json` merged with any shard
manifests (newest entry per (dataset, modality, case, class) wins). A folder without any manifest (e.g.
made by SAM-Med3D's own script) is read by scanning the layout instead.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from fastsam3d_cli.errors import BadInputError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fastsam3d-prepared"
MANIFEST_VERSION = 1
SHARD_MANIFEST_PATTERN = re.compile(r"^manifest\.shard-(\d+)-of-(\d+)\.json$")
IMAGES_DIR, LABELS_DIR, IGNORE_DIR = "imagesTr", "labelsTr", "ignoreTr"
EntryKey = tuple[str, str, str, str]  # (dataset, modality, case, class)


@dataclass(frozen=True)
class PreparedSample:
    """One training pair: a class of one case. Paths are absolute.

    `label_path` is binary uint8 (1 = `class_name`); `ignore_path`, when not None, marks voxels to leave
    out of the loss and of click sampling (1 = ignore). `voxels`/`volume_ml` describe the prepared label
    (None when the folder has no manifest). `spacing_mm` is the prepared isotropic spacing (None if unknown).
    """

    image_path: Path
    label_path: Path
    class_name: str
    dataset: str
    case: str
    modality: str | None = None
    ignore_path: Path | None = None
    spacing_mm: float | None = None
    voxels: int | None = None
    volume_ml: float | None = None


def shard_manifest_name(index: int, count: int) -> str:
    """File name of the partial manifest written by `--shard index/count`."""
    return f"manifest.shard-{index}-of-{count}.json"


def entry_key(entry: dict[str, Any]) -> EntryKey:
    return (entry["dataset"], entry["modality"], entry["case"], entry["class"])


def manifest_files(prepared_dir: Path) -> tuple[Path | None, list[Path]]:
    """(manifest.json or None, sorted shard manifests) present in `prepared_dir`."""
    prepared_dir = Path(prepared_dir)
    main = prepared_dir / MANIFEST_NAME
    shards = sorted(p for p in prepared_dir.glob("manifest.shard-*.json") if SHARD_MANIFEST_PATTERN.match(p.name))
    return (main if main.is_file() else None), shards


def read_manifest_file(path: Path) -> dict[str, Any]:
    """One manifest file, checked for format and version."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"cannot read prepared-data manifest {path}: {exc}",
                            "restore it, or delete it and re-run the same fastsam3d prepare command "
                            "(cases it no longer lists are prepared again)") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("entries"), list):
        raise BadInputError(f"{path} is not a fastsam3d prepared-data manifest",
                            "point to a folder written by fastsam3d prepare")
    if data.get("version") != MANIFEST_VERSION:
        raise BadInputError(f"{path} has manifest version {data.get('version')!r}; "
                            f"this fastsam3d reads version {MANIFEST_VERSION}",
                            "re-run fastsam3d prepare with this version into a new folder")
    return data


def load_manifest(prepared_dir: Path) -> dict[str, Any] | None:
    """`manifest.json` merged with every shard manifest, or None when the folder has none.

    Returns `{"spacing_mm", "sources", "entries": {key: entry}, "files": [paths read]}`. All files must
    agree on the spacing; for each key the entry with the latest `prepared_at` wins.
    """
    main, shards = manifest_files(prepared_dir)
    files = ([main] if main else []) + shards
    if not files:
        return None
    spacing = None
    sources: dict[str, Any] = {}
    entries: dict[EntryKey, dict[str, Any]] = {}
    for file in files:
        data = read_manifest_file(file)
        if spacing is None:
            spacing = data.get("spacing_mm")
        elif data.get("spacing_mm") != spacing:
            raise BadInputError(f"{file} was prepared at {data.get('spacing_mm')} mm "
                                f"but {files[0].name} at {spacing} mm",
                                "keep one spacing per prepared folder; prepare into a new folder")
        sources.update(data.get("sources") or {})
        for entry in data["entries"]:
            key = entry_key(entry)
            if key not in entries or entry.get("prepared_at", "") >= entries[key].get("prepared_at", ""):
                entries[key] = entry
    return {"spacing_mm": spacing, "sources": sources, "entries": entries, "files": files}


def list_prepared_samples(prepared_dir: Path, classes: Iterable[str] | None = None,
                          datasets: Iterable[str] | None = None) -> list[PreparedSample]:
    """Every written (case, class) pair of a prepared folder, sorted by class, dataset, case.

    `classes`/`datasets` restrict the result (unknown names are an error listing what exists). Raises
    `BadInputError` when the folder does not exist, holds no prepared data, or a listed file is missing.
    """
    prepared_dir = Path(prepared_dir).expanduser().absolute()
    if not prepared_dir.is_dir():
        raise BadInputError(f"prepared folder {prepared_dir} does not exist",
                            "run fastsam3d prepare RAW_DATASET_DIR -o PREPARED_DIR first")
    manifest = load_manifest(prepared_dir)
    samples = _samples_from_manifest(prepared_dir, manifest) if manifest else _samples_from_layout(prepared_dir)
    if not samples:
        raise BadInputError(f"{prepared_dir} holds no prepared samples (expected <class>/<modality>_<dataset>/"
                            f"{{{IMAGES_DIR},{LABELS_DIR}}}/<case>.nii.gz)",
                            "run fastsam3d prepare RAW_DATASET_DIR -o PREPARED_DIR first")
    keep_class = _selector(samples, "class", classes, lambda s: s.class_name)
    keep_dataset = _selector(samples, "dataset", datasets, lambda s: s.dataset)
    samples = [s for s in samples if keep_class(s) and keep_dataset(s)]
    return sorted(samples, key=lambda s: (s.class_name, s.dataset, s.case))


def _selector(samples: list[PreparedSample], what: str, wanted: Iterable[str] | None,
              get: Callable[[PreparedSample], str]) -> Callable[[PreparedSample], bool]:
    """A filter on one attribute; names not present in the folder are an error listing those that are."""
    if wanted is None:
        return lambda sample: True
    names = {re.sub(r"\s", "_", w.strip()) for w in wanted if w.strip()}
    available = sorted({get(s) for s in samples})
    unknown = sorted(names - set(available))
    if unknown:
        raise BadInputError(f"unknown {what} name(s) {', '.join(unknown)}; available: {', '.join(available)}",
                            f"choose from the {what} names listed")
    return lambda sample: get(sample) in names


def _samples_from_manifest(prepared_dir: Path, manifest: dict[str, Any]) -> list[PreparedSample]:
    samples = []
    spacing = manifest.get("spacing_mm")
    for entry in manifest["entries"].values():
        if entry.get("status") != "written":
            continue
        paths = {}
        for field in ("image_path", "label_path", "ignore_path"):
            if entry.get(field) is None:
                paths[field] = None
                continue
            path = prepared_dir / entry[field]
            if not path.is_file():
                raise BadInputError(f"{prepared_dir / MANIFEST_NAME} lists {entry[field]} but the file is missing",
                                    "re-run the same fastsam3d prepare command to restore it")
            recorded = entry.get(field.replace("_path", "_bytes"))
            if isinstance(recorded, int) and path.stat().st_size != recorded:  # cut, replaced or rewritten since
                raise BadInputError(f"prepared file {path} has {path.stat().st_size} bytes, the manifest records "
                                    f"{recorded}: it changed since prepare wrote it",
                                    "re-run the same fastsam3d prepare command (it redoes changed files)")
            paths[field] = path
        samples.append(PreparedSample(
            image_path=paths["image_path"], label_path=paths["label_path"], class_name=entry["class"],
            dataset=entry["dataset"], case=entry["case"], modality=entry.get("modality"),
            ignore_path=paths["ignore_path"], spacing_mm=spacing, voxels=entry.get("resampled_voxels"),
            volume_ml=entry.get("resampled_ml")))
    return samples


def _samples_from_layout(prepared_dir: Path) -> list[PreparedSample]:
    """No manifest: scan `<class>/<subset>/imagesTr/*.nii.gz` (SAM-Med3D-style folders)."""
    samples = []
    for image in sorted(prepared_dir.glob(f"*/*/{IMAGES_DIR}/*.nii.gz")):
        if image.name.startswith("."):
            continue  # temporary files of an interrupted writer
        subset_dir = image.parent.parent
        label = subset_dir / LABELS_DIR / image.name
        if not label.is_file():
            raise BadInputError(f"{image} has no label {label}",
                                "every image in imagesTr needs a label of the same name in labelsTr")
        ignore = subset_dir / IGNORE_DIR / image.name
        samples.append(PreparedSample(image_path=image, label_path=label, class_name=subset_dir.parent.name,
                                      dataset=subset_dir.name, case=image.name[: -len(".nii.gz")],
                                      ignore_path=ignore if ignore.is_file() else None))
    return samples
