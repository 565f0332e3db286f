"""`prepare`: nnU-Net v1/v2 raw datasets → per-class binary training data at an isotropic spacing.

For every case the image is read once and resampled once (linear), the label is checked (grid, values),
measured at its source resolution, resampled once by nearest neighbour onto the resampled image's grid,
and split into one binary uint8 label per class. A class whose volume that common grid changes by more
than 1% is written instead on the nearby grid placement that keeps it (`grid_placement`), image and
label resampled onto that moved grid the same way. The layout, the manifest and the `ignore` mask are
described in `fastsam3d_cli.data.prepared`. Orientation is kept as stored (no canonicalisation here; train
and infer reorient to RAS+ themselves, which is a lossless axis permutation).

Robustness: every file is written to a temporary name and renamed; the resampled image is written once
per case and grid and hard-linked into each class folder (copied when linking is impossible); `manifest.json`
records each finished (case, class) with a fingerprint of its source files and settings, so a re-run
skips complete work and redoes anything interrupted. Only the parent process writes the manifest;
`--shard K/N` runs write `manifest.shard-K-of-N.json` instead, merged by the next plain run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli import __version__
from fastsam3d_cli.imaging.atomic import atomic_path, write_text_atomic
from fastsam3d_cli.imaging.crops import MODEL_SPACING_MM
from fastsam3d_cli.errors import BadInputError, UsageError
from fastsam3d_cli.data.grid_placement import (COMMON_GRID, VOLUME_TOLERANCE, Grid, Shift, box_on_grid, choose_shift,
                                          grid_of, label_boxes, placement_shifts, resample_on_grid, shift_counts,
                                          shifted_grid, union_box)
from fastsam3d_cli.imaging.volumes import (describe_grid_difference, image_from_array_ijk, read_image,
                                   resample_like, resampled_grid, same_grid)
from fastsam3d_cli.data.nnunet import LabelClass, RawCase, RawDataset, load_raw_dataset, sanitize_name
from fastsam3d_cli.data.prepared import (IGNORE_DIR, IMAGES_DIR, LABELS_DIR, MANIFEST_FORMAT, MANIFEST_NAME,
                                    MANIFEST_VERSION, EntryKey, entry_key, load_manifest, manifest_files,
                                    read_manifest_file, shard_manifest_name)

ProgressCallback = Callable[[int, int, str], None]  # (cases done, cases total, case just finished or "")
MANIFEST_FLUSH_SECONDS = 30.0  # an interrupted run loses at most this much bookkeeping (work is redone)
GRID_FIX = "fix the label file, or pass --resample-labels to resample it onto the image by physical position"
IGNORE_ENCODING = (f"{IGNORE_DIR}/<case>.nii.gz beside {LABELS_DIR}: uint8, 1 = nnU-Net 'ignore' voxel "
                   "(exclude from loss and click sampling), 0 = annotated; ignore voxels are 0 in every label")


# -------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class PrepareSettings:
    """What decides the content of a prepared case (part of its fingerprint)."""

    spacing_mm: float = MODEL_SPACING_MM
    min_volume_mm3: float = 10.0
    resample_labels: bool = False
    shared_grid: bool = False  # True: every class of a case on one grid (no per-class volume-keeping placement)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'K/N' (1-based K) → (K, N); None stays None. Anything else is a usage error (exit 2)."""
    if text is None:
        return None
    parts = text.strip().split("/")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        index, count = int(parts[0]), int(parts[1])
        if count >= 1 and 1 <= index <= count:
            return index, count
    raise UsageError(f"--shard {text!r} is invalid", "write K/N with 1 <= K <= N, e.g. --shard 2/4")


def parse_class_list(text: str | None) -> list[str] | None:
    """'liver, spleen' → ['liver', 'spleen'] (spaces inside a name → '_'); None → None (all classes).

    A given list without a single name (`--classes ,` or an empty string) is a UsageError, not "all".
    """
    if text is None:
        return None
    names = [sanitize_name(n) for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--classes {text!r} names no class", "give comma-separated class names, or drop --classes")
    return names


# -------------------------------------------------------------------------------------------- results
@dataclass
class ClassSummary:
    """Per class over the cases of this run: written, skipped (too small / empty), absent, total mL."""

    name: str
    datasets: list[str] = field(default_factory=list)
    written: int = 0
    skipped: int = 0
    absent: int = 0
    total_ml: float = 0.0


@dataclass
class PrepareResult:
    """What `prepare_datasets` did; `to_json()` is the `--json` output."""

    output_dir: Path
    manifest_path: Path
    spacing_mm: float
    datasets: list[dict[str, Any]]
    classes: list[ClassSummary]
    cases_total: int
    cases_prepared: int
    cases_already_complete: int
    small_skips: list[dict[str, Any]]
    warnings: list[str]
    wall_s: float
    shard: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir), "manifest": str(self.manifest_path),
            "spacing_mm": self.spacing_mm, "shard": f"{self.shard[0]}/{self.shard[1]}" if self.shard else None,
            "datasets": self.datasets,
            "cases": {"total": self.cases_total, "prepared": self.cases_prepared,
                      "already_complete": self.cases_already_complete},
            "classes": [{"class": c.name, "datasets": c.datasets, "written": c.written, "skipped": c.skipped,
                         "absent": c.absent, "total_ml": round(c.total_ml, 3)} for c in self.classes],
            "skipped_small": self.small_skips, "warnings": self.warnings, "wall_s": round(self.wall_s, 3),
        }


# ---------------------------------------------------------------------------------------- case jobs
@dataclass(frozen=True)
class CaseJob:
    """Everything a worker process needs to prepare one case (picklable)."""

    dataset: str
    modality: str
    case: RawCase
    classes: tuple[LabelClass, ...]  # only the classes that still need work
    allowed_values: frozenset[int]
    ignore_value: int | None
    output_dir: Path
    settings: PrepareSettings
    fingerprint: str


def prepare_case(job: CaseJob) -> list[dict[str, Any]]:
    """Prepare one case; return one manifest entry per class of `job.classes`.

    Reads and validates everything before writing anything, so a bad case leaves no file behind.
    Voxel counts: `source_*` on the label as stored, `resampled_*` on the written binary label.
    """
    where = f"{job.dataset} case {job.case.case_id}"
    image = _read_for_case(job.case.image_path, job.case.channel_in_file, "image", where)
    label = _read_for_case(job.case.label_path, None, "label", where)
    if not same_grid(image, label):
        if not job.settings.resample_labels:
            raise BadInputError(f"{where}: image and label grids differ ({describe_grid_difference(image, label)})",
                                GRID_FIX)
    label_values = _integer_label_values(label, where)
    counts = _count_values(label_values, job.allowed_values, where)
    source_voxel_mm3 = float(np.prod(label.GetSpacing()))
    del label_values

    image_out = _resample_image_linear(image, resampled_grid(image, job.settings.spacing_mm))
    label_int = _as_integer_image(label)
    label_out_image = resample_like(label_int, image_out, "nearest")
    # ijk-ordered view (no copy; valid while label_out_image lives): per-class masks computed on it keep
    # its memory layout, so writing each mask back needs no transposed copy.
    label_out = sitk.GetArrayViewFromImage(label_out_image).transpose(2, 1, 0)
    out_voxel_mm3 = float(np.prod(image_out.GetSpacing()))

    subset = f"{job.modality}_{job.dataset}"
    # Voxels per label value on the common grid, in one pass (a class's count is the sum over its values).
    out_counts = _count_values(sitk.GetArrayViewFromImage(label_out_image).ravel(), job.allowed_values, where)
    has_ignore = job.ignore_value is not None and job.ignore_value < len(counts)
    ignore_source = int(counts[job.ignore_value]) if has_ignore else 0
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")

    shifts = [] if job.settings.shared_grid else placement_shifts(label_int, grid_of(image_out))
    entries: list[dict[str, Any]] = []
    placed: dict[Shift, list[tuple[LabelClass, dict[str, Any]]]] = {}  # (0, 0, 0): the common grid
    needy: list[tuple[LabelClass, dict[str, Any], float, int]] = []  # (class, entry, expected, common count)
    for cls in job.classes:
        source_voxels = int(sum(int(counts[v]) for v in cls.values if v < len(counts)))
        entry = _new_entry(job, cls, source_voxels, source_voxel_mm3, ignore_source, now)
        entries.append(entry)
        volume_mm3 = source_voxels * source_voxel_mm3
        if source_voxels == 0:
            entry.update(reason="absent: no voxels of this class in the case", reason_code="absent")
        elif volume_mm3 < job.settings.min_volume_mm3:
            entry.update(reason=f"below --min-volume-mm3: {volume_mm3:.1f} mm³ < {job.settings.min_volume_mm3:g} mm³",
                         reason_code="too_small")
        else:
            resampled = int(sum(int(out_counts[v]) for v in cls.values if v < len(out_counts)))
            expected = volume_mm3 / out_voxel_mm3
            if shifts and abs(resampled / expected - 1.0) > VOLUME_TOLERANCE:  # a vanished class too
                needy.append((cls, entry, expected, resampled))
            else:
                placed.setdefault(COMMON_GRID, []).append((cls, entry))
    if needy:
        boxes = label_boxes(label_int)  # one pass; each class's box, mapped onto the common grid, bounds its search
        for cls, entry, expected, resampled in needy:
            box = box_on_grid(label_int, union_box([boxes[v] for v in cls.values if v in boxes]), grid_of(image_out))
            shift = choose_shift(expected, resampled, shift_counts(label_int, grid_of(image_out), box, cls.values,
                                                                   shifts), shifts)
            placed.setdefault(shift or COMMON_GRID, []).append((cls, entry))  # None: nothing beats the common grid

    for shift in sorted(placed):
        if shift == COMMON_GRID:
            _write_classes_on_grid(job, image_out, label_out, shift, placed[shift], subset)
        else:  # the image and labels resampled onto the moved grid, exactly as onto the common one
            moved = shifted_grid(grid_of(image_out), shift)
            labels_moved = resample_on_grid(label_int, moved, "nearest")  # 0 outside the label, as on the common grid
            _write_classes_on_grid(job, _resample_image_linear(image, moved),
                                   sitk.GetArrayViewFromImage(labels_moved).transpose(2, 1, 0), shift, placed[shift],
                                   subset)
    return entries


def _write_classes_on_grid(job: CaseJob, image: sitk.Image, labels_ijk: np.ndarray, shift: Shift,
                           placed: list[tuple[LabelClass, dict[str, Any]]], subset: str) -> None:
    """Write the classes placed on one grid (the common one, or it moved by `shift`; see `grid_placement`):
    each binary label, then the grid's image (and ignore mask) once, hard-linked into each class folder.
    `image` is on that grid and `labels_ijk` is the label map resampled onto it (nearest neighbour)."""
    voxel_mm3 = float(np.prod(image.GetSpacing()))
    ignore_ijk = labels_ijk == job.ignore_value if job.ignore_value is not None else None
    ignore_voxels = int(ignore_ijk.sum()) if ignore_ijk is not None else 0
    written = []
    for cls, entry in placed:
        mask = _binary_mask(labels_ijk, cls.values)
        resampled = int(mask.sum())
        entry.update(resampled_voxels=resampled, resampled_ml=round(resampled * voxel_mm3 / 1000.0, 6),
                     ignore_voxels=ignore_voxels)
        if resampled == 0:  # only on the common grid: a moved grid that loses the class is never chosen
            entry.update(reason=f"empty after resampling to {job.settings.spacing_mm:g} mm",
                         reason_code="empty_after_resampling")
            continue
        written.append(entry)
        folder, file_name = f"{cls.name}/{subset}", f"{job.case.case_id}.nii.gz"
        entry.update(status="written", grid_shift_mm=[round(v, 6) for v in shift],
                     image_path=f"{folder}/{IMAGES_DIR}/{file_name}", label_path=f"{folder}/{LABELS_DIR}/{file_name}",
                     ignore_path=f"{folder}/{IGNORE_DIR}/{file_name}" if ignore_voxels else None)
        label_file = job.output_dir / entry["label_path"]
        _write_volume(image_from_array_ijk(mask, image), label_file)
        entry["label_bytes"] = label_file.stat().st_size
    _write_shared(image, [job.output_dir / e["image_path"] for e in written])
    if ignore_voxels and written:
        _write_shared(image_from_array_ijk(ignore_ijk.view(np.uint8), image),
                      [job.output_dir / e["ignore_path"] for e in written])
    for entry in written:
        entry["image_bytes"] = (job.output_dir / entry["image_path"]).stat().st_size
        if entry["ignore_path"]:
            entry["ignore_bytes"] = (job.output_dir / entry["ignore_path"]).stat().st_size


def _new_entry(job: CaseJob, cls: LabelClass, source_voxels: int, source_voxel_mm3: float, ignore_source: int,
               now: str) -> dict[str, Any]:
    """A manifest entry for one (case, class), as 'skipped' until the label is written."""
    return {
        "dataset": job.dataset, "modality": job.modality, "case": job.case.case_id, "class": cls.name,
        "source_class": cls.source_name, "values": list(cls.values), "status": "skipped", "reason": None,
        "reason_code": None, "source_voxels": source_voxels,
        "source_ml": round(source_voxels * source_voxel_mm3 / 1000.0, 6),
        "source_voxel_mm3": source_voxel_mm3, "resampled_voxels": None, "resampled_ml": None,
        "ignore_voxels_source": ignore_source, "ignore_voxels": None,
        "grid_shift_mm": None, "image_path": None, "label_path": None, "ignore_path": None,
        "image_bytes": None, "label_bytes": None, "ignore_bytes": None,
        "source_image": str(job.case.image_path), "source_label": str(job.case.label_path),
        "fingerprint": job.fingerprint, "prepared_at": now,
    }


def _binary_mask(label_ijk: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """uint8 {0, 1} mask of voxels whose label is in `values` (same memory layout as `label_ijk`)."""
    inside = label_ijk == values[0] if len(values) == 1 else np.isin(label_ijk, values)
    return inside.view(np.uint8)  # bool and uint8 share their bytes: no copy


def _read_for_case(path: Path, channel: int | None, what: str, where: str) -> sitk.Image:
    try:
        return read_image(path, channel=channel, what=what)
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc.message}", exc.fix) from None


def _integer_label_values(label: sitk.Image, where: str) -> np.ndarray:
    """Label voxels as a flat non-negative integer array (float files must hold whole numbers)."""
    values = sitk.GetArrayViewFromImage(label).ravel()  # a view: valid while the caller holds `label`
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise BadInputError(f"{where}: label file holds non-integer values",
                                "labels must be whole numbers (a label map)")
        values = values.astype(np.int64)
    elif values.dtype.kind not in "iu":
        raise BadInputError(f"{where}: label file has pixel type {label.GetPixelIDTypeAsString()}",
                            "save labels as integers")
    return values


COUNT_CHUNK_VOXELS = 1 << 24  # bincount works on int64: count in chunks so memory stays bounded


def _count_values(values: np.ndarray, allowed: frozenset[int], where: str) -> np.ndarray:
    """Voxel count per label value (index = value); a value not in dataset.json `labels` is an error."""
    declared = f"not in dataset.json labels ({_fmt_values(allowed)})"
    fix = "fix the label file or declare the value(s) in dataset.json"
    if values.size == 0:
        return np.zeros(1, dtype=np.int64)
    lowest, highest = int(values.min()), int(values.max())
    if lowest < 0 or highest > max(allowed):  # also avoids a huge bincount for a garbage value
        raise BadInputError(f"{where}: label value(s) {lowest if lowest < 0 else highest} {declared}", fix)
    counts = np.zeros(highest + 1, dtype=np.int64)
    for start in range(0, values.size, COUNT_CHUNK_VOXELS):
        counts += np.bincount(values[start:start + COUNT_CHUNK_VOXELS].astype(np.int64), minlength=highest + 1)
    unknown = sorted(set(np.flatnonzero(counts).tolist()) - set(allowed))
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise BadInputError(f"{where}: label value(s) {shown} {declared}", fix)
    return counts


def _fmt_values(values: frozenset[int]) -> str:
    ordered = sorted(values)
    if ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 3:
        return f"{ordered[0]}..{ordered[-1]}"
    return ", ".join(str(v) for v in ordered)


def _as_integer_image(label: sitk.Image) -> sitk.Image:
    """Float label files (whole numbers, checked before) become int32 so nearest resampling stays exact."""
    if label.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        return sitk.Cast(sitk.Round(label), sitk.sitkInt32)
    return label


def _resample_image_linear(image: sitk.Image, grid: Grid) -> sitk.Image:
    """Linear resampling onto `grid`, computed in float32; integer images are rounded back to their own type.
    A moved grid may reach a third of a voxel past the volume's edge: the nearest voxel's value is used there."""
    pixel = image.GetPixelID()
    if pixel in (sitk.sitkFloat32, sitk.sitkFloat64):
        return resample_on_grid(image, grid, "linear", extrapolate=True)
    resampled = resample_on_grid(sitk.Cast(image, sitk.sitkFloat32), grid, "linear", extrapolate=True)
    return sitk.Cast(sitk.Round(resampled), pixel)


def _make_folder(folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)


def _write_volume(image: sitk.Image, path: Path) -> None:
    _make_folder(path.parent)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def _write_shared(image: sitk.Image, targets: list[Path]) -> None:
    """Write `image` once and hard-link it to every target (copy when links are impossible), atomically."""
    if not targets:
        return
    first, others = targets[0], targets[1:]
    _make_folder(first.parent)
    with atomic_path(first) as staged:
        sitk.WriteImage(image, str(staged), useCompression=True)
        for target in others:
            _make_folder(target.parent)
            link_or_copy(staged, target)


def link_or_copy(source: Path, target: Path) -> str:
    """Place `source` at `target` atomically: a hard link when possible, else a copy. Returns which."""
    import shutil

    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
            return "link"
        except OSError:
            shutil.copyfile(source, tmp)
            return "copy"


def _init_worker(threads: int) -> None:
    """Worker processes share the CPU: give each ITK filter a fair number of threads."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


# ------------------------------------------------------------------------------------------ manifest
class ManifestStore:
    """The prepared folder's manifest as the parent process sees it (workers never write it)."""

    def __init__(self, output_dir: Path, spacing_mm: float, shard: tuple[int, int] | None) -> None:
        self.output_dir = output_dir
        self.spacing_mm = spacing_mm
        self.shard = shard
        existing = load_manifest(output_dir)
        self.entries: dict[EntryKey, dict[str, Any]] = dict(existing["entries"]) if existing else {}
        self.sources: dict[str, Any] = dict(existing["sources"]) if existing else {}
        self.created = existing is None
        if existing and existing["spacing_mm"] is not None and not math.isclose(existing["spacing_mm"], spacing_mm):
            raise BadInputError(f"{output_dir} was prepared at {existing['spacing_mm']:g} mm, not {spacing_mm:g} mm",
                                f"pass --spacing {existing['spacing_mm']:g}, or prepare into another folder with -o")
        self.own_keys: set[EntryKey] = set()
        self.recorded_this_run = 0
        self.removed: list[str] = []  # what this run dropped because its source is gone (said as warnings)
        self._last_flush = time.monotonic()

    @property
    def path(self) -> Path:
        name = shard_manifest_name(*self.shard) if self.shard else MANIFEST_NAME
        return self.output_dir / name

    def record(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            key = entry_key(entry)
            previous = self.entries.get(key)
            self.entries[key] = entry
            if previous is not None and previous.get("status") == "written" and entry.get("status") != "written":
                # E.g. the class was emptied in the source label: its earlier files must not outlive it.
                self._remove_files(previous)
                self.removed.append(f"{'/'.join((entry['dataset'], entry['case'], entry['class']))}: now "
                                    f"{entry.get('reason') or entry.get('status')}; its earlier prepared files "
                                    "were removed")
        self.recorded_this_run += len(entries)

    def drop_sourceless(self, datasets: Sequence[RawDataset]) -> None:
        """Forget entries of these datasets whose case or class the source no longer has, and delete their files.

        A re-run over the same dataset otherwise keeps serving data that no longer exists in the source (a case
        deleted, a class removed from dataset.json). Other datasets' entries are left alone.
        """
        present = {d.name: ({c.case_id for c in d.cases}, {c.name for c in d.classes}) for d in datasets}
        gone: dict[str, list[str]] = {}
        for key, entry in list(self.entries.items()):
            cases, classes = present.get(entry["dataset"], (None, None))
            if cases is None:
                continue
            if entry["case"] in cases and entry["class"] in classes:
                continue
            reason = (f"case {entry['case']} is gone" if entry["case"] not in cases
                      else f"class {entry['class']} is gone")
            gone.setdefault(f"{entry['dataset']}: {reason}", []).append(entry["case"])
            del self.entries[key]
            self._remove_files(entry)
        for what, items in sorted(gone.items()):
            self.removed.append(f"{what} from the source; dropped its {len(items)} manifest entr"
                                f"{'y' if len(items) == 1 else 'ies'} and their prepared files")

    def _remove_files(self, entry: dict[str, Any]) -> None:
        """Delete an entry's files that no remaining entry lists, then the folders that leaves empty."""
        listed = {e.get(f) for e in self.entries.values() for f in ("image_path", "label_path", "ignore_path")}
        for field_name in ("image_path", "label_path", "ignore_path"):
            relative = entry.get(field_name)
            if relative is None or relative in listed:
                continue
            file = self.output_dir / relative
            file.unlink(missing_ok=True)
            for folder in (file.parent, file.parent.parent, file.parent.parent.parent):
                if folder == self.output_dir or self.output_dir not in folder.parents:
                    break
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty

    def flush(self, final: bool = False, force: bool = False) -> None:
        """Write the manifest atomically (at most every MANIFEST_FLUSH_SECONDS unless final/force)."""
        if not (final or force) and time.monotonic() - self._last_flush < MANIFEST_FLUSH_SECONDS:
            return
        absorbed: list[Path] = []
        if final and not self.shard:
            absorbed = self._absorb_shard_manifests()
        keys = self.own_keys if self.shard else self.entries.keys()
        entries = sorted((self.entries[k] for k in keys if k in self.entries),
                         key=lambda e: (e["class"], e["dataset"], e["modality"], e["case"]))
        payload = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "created_by": f"fastsam3d {__version__}",
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "spacing_mm": self.spacing_mm,
            "shard": f"{self.shard[0]}/{self.shard[1]}" if self.shard else None,
            "layout": f"<class>/<modality>_<dataset>/{{{IMAGES_DIR},{LABELS_DIR},{IGNORE_DIR}}}/<case>.nii.gz",
            "label_encoding": "binary uint8: 1 = the class, 0 = anything else (including ignore voxels)",
            "ignore_encoding": IGNORE_ENCODING,
            "sources": self.sources, "entries": entries,
        }
        write_text_atomic(self.path, json.dumps(payload, indent=1) + "\n")
        for file in absorbed:
            file.unlink(missing_ok=True)
        self._last_flush = time.monotonic()

    def _absorb_shard_manifests(self) -> list[Path]:
        """A plain run's final manifest takes in every shard manifest (newest entry wins), then removes them."""
        _, shard_files = manifest_files(self.output_dir)
        for file in shard_files:
            data = read_manifest_file(file)
            self.sources.update(data.get("sources") or {})
            for entry in data["entries"]:
                key = entry_key(entry)
                if key not in self.entries or entry.get("prepared_at", "") >= self.entries[key].get("prepared_at", ""):
                    self.entries[key] = entry
        return shard_files

    def is_complete(self, key: EntryKey, fingerprint: str) -> bool:
        """True when the entry exists for the same sources/settings and its files are all in place."""
        entry = self.entries.get(key)
        if entry is None or entry.get("fingerprint") != fingerprint:
            return False
        if entry.get("status") != "written":
            return True
        for path_field, size_field in (("image_path", "image_bytes"), ("label_path", "label_bytes"),
                                       ("ignore_path", "ignore_bytes")):
            if entry.get(path_field) is None:
                continue
            file = self.output_dir / entry[path_field]
            if not file.is_file() or file.stat().st_size != entry.get(size_field):
                return False
        return True


# -------------------------------------------------------------------------------------------- checks
def _check_output_dir(output_dir: Path, raw_dirs: Sequence[Path]) -> None:
    """-o must not be inside an input dataset, must be a folder, and (if not empty) one of ours."""
    real_out = Path(os.path.realpath(output_dir))
    for raw in raw_dirs:
        real_raw = Path(os.path.realpath(raw))
        if real_out == real_raw or real_raw in real_out.parents:
            raise BadInputError(f"output folder {output_dir} is inside input dataset {raw}",
                                "choose an output folder outside the raw datasets (inputs are never modified)")
    if output_dir.exists() and not output_dir.is_dir():
        raise BadInputError(f"output {output_dir} is a file", "give a folder with -o")
    if output_dir.is_dir():
        main, shards = manifest_files(output_dir)
        if main is None and not shards and not _only_prepared_layout(output_dir):
            raise BadInputError(f"output folder {output_dir} is not empty and has no {MANIFEST_NAME}",
                                "choose a new or empty folder, or one written by fastsam3d prepare")
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise BadInputError(f"output folder {output_dir} is not writable", "choose a writable location with -o")
    elif not output_dir.parent.is_dir():
        raise BadInputError(f"parent folder {output_dir.parent} of the output does not exist",
                            "create it first or choose another -o")
    elif not os.access(output_dir.parent, os.W_OK | os.X_OK):
        raise BadInputError(f"output folder {output_dir} cannot be created: {output_dir.parent} is not writable",
                            "choose a writable location with -o")


def _only_prepared_layout(folder: Path) -> bool:
    """True when `folder` holds nothing but <class>/<subset>/{imagesTr,labelsTr,ignoreTr} folders (or is empty).

    Lets a run rebuild a folder whose manifest was lost, without ever writing into someone else's folder.
    """
    allowed = {IMAGES_DIR, LABELS_DIR, IGNORE_DIR}
    for class_dir in (p for p in folder.iterdir() if not p.name.startswith(".")):
        if not class_dir.is_dir():
            return False
        for subset in class_dir.iterdir():
            if not subset.is_dir() or not {p.name for p in subset.iterdir()} <= allowed:
                return False
    return True


class _Header:
    """Geometry of a file read from its header only (duck-types the getters `same_grid` uses)."""

    def __init__(self, reader: sitk.ImageFileReader) -> None:
        self.dimension, self.components = reader.GetDimension(), reader.GetNumberOfComponents()
        self._size, self._spacing = reader.GetSize(), reader.GetSpacing()
        self._origin, self._direction = reader.GetOrigin(), reader.GetDirection()

    def GetSize(self): return self._size  # noqa: E704,N802 - SimpleITK naming on purpose
    def GetSpacing(self): return self._spacing  # noqa: E704,N802
    def GetOrigin(self): return self._origin  # noqa: E704,N802
    def GetDirection(self): return self._direction  # noqa: E704,N802


def _read_header(path: Path) -> _Header | None:
    """Header of a volume, or None when SimpleITK cannot read it (the full read decides then)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return _Header(reader)


MAX_GRID_VOXELS = 2**30  # one float32 volume of this many voxels is 4 GiB; a finer --spacing is a mistake


def preflight_case(dataset: RawDataset, case: RawCase, resample_labels: bool,
                   spacing_mm: float | None = None) -> None:
    """Header-only checks before any output is written: 4D without --channel, mismatched grids, and a
    `spacing_mm` that would make a grid too large to allocate (a usage error naming the grid size)."""
    where = f"{dataset.name} case {case.case_id}"
    image, label = _read_header(case.image_path), _read_header(case.label_path)
    if image is not None and spacing_mm is not None:
        size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(image.GetSize()[:3], image.GetSpacing()[:3])]
        if math.prod(size) > MAX_GRID_VOXELS:
            raise UsageError(f"--spacing {spacing_mm:g} would resample {where} onto a {'×'.join(map(str, size))} "
                             f"grid ({math.prod(size) / 1e9:.3g} billion voxels, {math.prod(size) * 4 / 2**30:.0f} "
                             "GiB as float32)", "give a coarser --spacing in mm (the models work at 1.5)")
    if image is not None and (image.dimension == 4 or image.components > 1) and case.channel_in_file is None:
        channels = image.GetSize()[3] if image.dimension == 4 else image.components
        if case.channel_per_file:  # --channel picks a CASE_XXXX file here: no value of it could help
            raise BadInputError(f"{where}: image {case.image_path} is 4D with {channels} channels, but this dataset "
                                "keeps one 3D channel per file (CASE_0000, CASE_0001, … as named in channel_names)",
                                "split the 4D file into one 3D file per channel (and list each in channel_names)")
        raise BadInputError(f"{where}: image {case.image_path} is 4D with {channels} channels",
                            "choose one with --channel N (0-based)")
    if label is not None and (label.dimension != 3 or label.components != 1):
        raise BadInputError(f"{where}: label {case.label_path} is not a 3D label map",
                            "give one 3D integer label file per case")
    if image is None or label is None or image.dimension != 3 or image.components != 1 or resample_labels:
        return
    if not same_grid(image, label):  # type: ignore[arg-type]
        difference = describe_grid_difference(image, label)  # type: ignore[arg-type]
        raise BadInputError(f"{where}: image and label grids differ ({difference})", GRID_FIX)


def case_fingerprint(dataset: RawDataset, case: RawCase, settings: PrepareSettings) -> str:
    """Identity of a case's inputs and settings: if any changes, the case is prepared again."""
    def stat(path: Path) -> list[Any]:
        info = path.stat()
        return [str(path), info.st_size, info.st_mtime_ns]

    payload = {"dataset_json": dataset.dataset_json_sha256, "image": stat(case.image_path),
               "label": stat(case.label_path), "channel_in_file": case.channel_in_file,
               "spacing_mm": settings.spacing_mm, "min_volume_mm3": settings.min_volume_mm3,
               "resample_labels": settings.resample_labels, "manifest_version": MANIFEST_VERSION,
               "grid": "shared" if settings.shared_grid else f"per-class within {VOLUME_TOLERANCE:g}"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------ the API
def prepare_datasets(raw_dirs: Sequence[Path | str], output_dir: Path | str, *, spacing_mm: float = MODEL_SPACING_MM,
                     min_volume_mm3: float = 10.0, classes: Sequence[str] | None = None, channel: int | None = None,
                     workers: int = 1, shard: tuple[int, int] | None = None, resample_labels: bool = False,
                     shared_grid: bool = False, progress: ProgressCallback | None = None) -> PrepareResult:
    """Prepare nnU-Net v1/v2 raw datasets into `output_dir` (see the module docstring for the layout).

    `classes` restricts to these class names (dataset spelling, spaces → `_`); `channel` picks the
    modality of multi-channel datasets; `shard=(K, N)` prepares every N-th case starting at the K-th
    (1-based) over all datasets' cases in order. A class whose volume the case's common grid changes by more
    than 1% is written on the nearby grid placement that keeps it best (`grid_placement`); `shared_grid`
    keeps every class of a case on the common grid. Raises `BadInputError` (exit 3) for unusable input,
    `UsageError` (exit 2) for impossible options. Re-running skips (case, class) pairs already complete.
    """
    started = time.perf_counter()
    settings = _validated_settings(spacing_mm, min_volume_mm3, workers, channel, shard, resample_labels, shared_grid)
    if not raw_dirs:
        raise UsageError("no raw dataset folder given", "pass at least one RAW_DATASET_DIR")
    raw_paths = [Path(p).expanduser().absolute() for p in raw_dirs]
    output_dir = Path(output_dir).expanduser().absolute()
    datasets = [load_raw_dataset(p, channel=channel) for p in raw_paths]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise BadInputError(f"two input datasets are both named {duplicate}",
                            "each dataset folder name must be unique (it becomes part of the output layout)")
    _check_output_dir(output_dir, raw_paths)
    wanted = _requested_classes(datasets, classes)
    warnings = [w for d in datasets for w in d.warnings]

    plan = [(dataset, case) for dataset in datasets if wanted[dataset.name] for case in dataset.cases]
    warnings += [f"{d.name}: none of the requested classes exists in this dataset; skipped"
                 for d in datasets if not wanted[d.name]]
    if shard:
        plan = plan[shard[0] - 1:: shard[1]]
    for dataset, case in plan:
        preflight_case(dataset, case, resample_labels, settings.spacing_mm)

    existed = output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a read-only file system, which os.access does not always see
        raise BadInputError(f"output folder {output_dir} cannot be created: {exc.strerror or exc}",
                            "choose a writable location with -o") from None
    store = ManifestStore(output_dir, settings.spacing_mm, shard)
    for dataset in datasets:
        store.sources[dataset.name] = _source_record(dataset)
    if not shard:  # shards of one folder may run at the same time: only a plain run forgets
        store.drop_sourceless(datasets)
    jobs, complete = _plan_jobs(plan, wanted, store, settings, output_dir)
    if not shard:
        _remove_stale_partials(output_dir)
    store.flush(force=True)
    try:
        _run_jobs(jobs, store, workers, progress, total=len(plan), already_done=complete)
    except BaseException:
        store.flush(force=True)
        if store.created and store.recorded_this_run == 0:
            _remove_untouched(output_dir, store.path, remove_root=not existed)
        raise
    store.flush(final=True)
    warnings += store.removed
    summaries, small = _summarise(plan, wanted, store)
    return PrepareResult(output_dir=output_dir, manifest_path=store.path, spacing_mm=settings.spacing_mm,
                         datasets=[{"name": d.name, "path": str(d.root), "format": d.format, "modality": d.modality,
                                    "cases": len(d.cases), "classes": len(wanted[d.name]),
                                    "ignore_label": d.labels.ignore_value} for d in datasets],
                         classes=summaries, cases_total=len(plan), cases_prepared=len(jobs),
                         cases_already_complete=complete, small_skips=small, warnings=warnings,
                         wall_s=time.perf_counter() - started, shard=shard)


def _validated_settings(spacing_mm: float, min_volume_mm3: float, workers: int, channel: int | None,
                        shard: tuple[int, int] | None, resample_labels: bool, shared_grid: bool) -> PrepareSettings:
    if not (math.isfinite(spacing_mm) and spacing_mm > 0):
        raise UsageError(f"--spacing {spacing_mm} is invalid", "give a positive spacing in mm, e.g. --spacing 1.5")
    if not (math.isfinite(min_volume_mm3) and min_volume_mm3 >= 0):
        raise UsageError(f"--min-volume-mm3 {min_volume_mm3} is invalid", "give a volume >= 0 in mm³")
    if workers < 1:
        raise UsageError(f"--workers {workers} is invalid", "give 1 or more worker processes")
    if channel is not None and channel < 0:
        raise UsageError(f"--channel {channel} is invalid", "channels are numbered from 0")
    if shard is not None and not (1 <= shard[0] <= shard[1]):
        raise UsageError(f"--shard {shard[0]}/{shard[1]} is invalid", "write K/N with 1 <= K <= N")
    return PrepareSettings(spacing_mm=float(spacing_mm), min_volume_mm3=float(min_volume_mm3),
                           resample_labels=resample_labels, shared_grid=shared_grid)


def _requested_classes(datasets: list[RawDataset], classes: Sequence[str] | None) -> dict[str, tuple[LabelClass, ...]]:
    """Per dataset, the classes to prepare; an unknown requested name is an error listing what exists."""
    if not classes:
        return {d.name: d.classes for d in datasets}
    requested = [sanitize_name(c) for c in classes]
    available = sorted({c.name for d in datasets for c in d.classes})
    unknown = [c for c in requested if c not in available]
    if unknown:
        raise BadInputError(f"unknown class(es) {', '.join(unknown)}; available: {', '.join(available)}",
                            "use class names as dataset.json spells them (spaces → _)")
    return {d.name: tuple(c for c in d.classes if c.name in requested) for d in datasets}


def _source_record(dataset: RawDataset) -> dict[str, Any]:
    """What the manifest says about a source dataset (format, dataset.json hash, modality, classes, ignore)."""
    return {"path": str(dataset.root), "format": dataset.format, "dataset_json_sha256": dataset.dataset_json_sha256,
            "channel": dataset.channel, "modality": dataset.modality, "cases": len(dataset.cases),
            "ignore_label": dataset.labels.ignore_value,
            "ignore_representation": IGNORE_ENCODING if dataset.labels.ignore_value is not None else None,
            "classes": {c.name: list(c.values) for c in dataset.classes}}


def _plan_jobs(plan: list[tuple[RawDataset, RawCase]], wanted: dict[str, tuple[LabelClass, ...]],
               store: ManifestStore, settings: PrepareSettings, output_dir: Path) -> tuple[list[CaseJob], int]:
    """One job per case with any (case, class) not yet complete; count the cases already complete."""
    jobs, complete = [], 0
    for dataset, case in plan:
        fingerprint = case_fingerprint(dataset, case, settings)
        keys = {c.name: (dataset.name, dataset.modality, case.case_id, c.name) for c in wanted[dataset.name]}
        store.own_keys.update(keys.values())
        todo = tuple(c for c in wanted[dataset.name] if not store.is_complete(keys[c.name], fingerprint))
        if not todo:
            complete += 1
            continue
        jobs.append(CaseJob(dataset=dataset.name, modality=dataset.modality, case=case, classes=todo,
                            allowed_values=dataset.labels.allowed_values, ignore_value=dataset.labels.ignore_value,
                            output_dir=output_dir, settings=settings, fingerprint=fingerprint))
    return jobs, complete


def _run_jobs(jobs: list[CaseJob], store: ManifestStore, workers: int, progress: ProgressCallback | None,
              total: int, already_done: int) -> None:
    """Run case jobs in this process (workers=1) or a process pool; record results as they finish."""
    done = already_done
    if progress:
        progress(done, total, "")
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            store.record(prepare_case(job))
            store.flush()
            done += 1
            if progress:
                progress(done, total, f"{job.dataset}/{job.case.case_id}")
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no fork: safe next to threaded libraries
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending: dict[Future, CaseJob] = {pool.submit(prepare_case, job): job for job in jobs}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    job = pending.pop(future)
                    store.record(_worker_result(future))
                    done += 1
                    if progress:
                        progress(done, total, f"{job.dataset}/{job.case.case_id}")
                store.flush()
        except BaseException:
            for future in pending:
                future.cancel()
            for future, job in pending.items():  # keep the work of cases that still finish cleanly
                if not future.cancelled():
                    try:
                        store.record(future.result())
                    except BaseException:  # noqa: BLE001 - the first error is the one reported
                        pass
            raise


def _worker_result(future: Future) -> list[dict[str, Any]]:
    """A finished case's entries; a worker that died (not an error it raised) becomes one clear error."""
    from concurrent.futures.process import BrokenProcessPool

    from fastsam3d_cli.errors import DeviceError

    try:
        return future.result()
    except BrokenProcessPool:
        raise DeviceError(
            "a prepare worker process died before finishing its case (killed, e.g. for memory; or, called from "
            "a Python script, prepare_datasets(workers > 1) is not under `if __name__ == \"__main__\":`, which "
            "worker processes need)",
            "use fewer --workers (finished cases are kept and a re-run resumes), or guard the call in your "
            "script") from None


def _remove_stale_partials(output_dir: Path) -> None:
    """Temporary files a killed run (SIGKILL, power loss) could not remove; never complete outputs.

    Only plain runs do this: shards of one folder may be running on other machines at the same time.
    """
    for folder in output_dir.iterdir():
        if folder.is_dir():
            for stale in folder.glob("*/*/.*.partial*"):
                stale.unlink(missing_ok=True)


def _remove_untouched(output_dir: Path, manifest: Path, remove_root: bool) -> None:
    """After a failure of a run that started the manifest and finished no case: leave no trace.

    Only the manifest this run created and folders left empty are removed (never a data file).
    """
    manifest.unlink(missing_ok=True)
    for folder in sorted((p for p in output_dir.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
    if remove_root:
        with contextlib.suppress(OSError):
            output_dir.rmdir()


def _summarise(plan: list[tuple[RawDataset, RawCase]], wanted: dict[str, tuple[LabelClass, ...]],
               store: ManifestStore) -> tuple[list[ClassSummary], list[dict[str, Any]]]:
    """Per class over this run's cases: written / skipped / absent / total source mL; list of small skips."""
    summaries: dict[str, ClassSummary] = {}
    small = []
    for dataset, case in plan:
        for cls in wanted[dataset.name]:
            summary = summaries.setdefault(cls.name, ClassSummary(cls.name))
            if dataset.name not in summary.datasets:
                summary.datasets.append(dataset.name)
            entry = store.entries.get((dataset.name, dataset.modality, case.case_id, cls.name))
            if entry is None:
                continue
            if entry["status"] == "written":
                summary.written += 1
                summary.total_ml += entry["source_ml"]
            elif entry["reason_code"] == "absent":
                summary.absent += 1
            else:
                summary.skipped += 1
                small.append({"dataset": dataset.name, "case": case.case_id, "class": cls.name,
                              "source_mm3": round(entry["source_ml"] * 1000.0, 3), "reason": entry["reason"]})
    return sorted(summaries.values(), key=lambda s: s.name), small
