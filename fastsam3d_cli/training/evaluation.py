"""Scoring on unseen data: Dice after 1..N simulated clicks, per target, on each volume's own grid.

The yardstick of issue 16 (docs/evaluation.md). A *target* is one binary structure of one volume: a
class of a training dataset ("seen") or a structure of `data/validation/` ("unseen", never trained on).
Each *method* (the classical floor, the untrained model, a checkpoint through the real `Predictor`) is
scored on every target with the same deterministic clicks protocol:

* click 1: include, at the target's voxel farthest from its border;
* click k > 1: the largest connected error region (6-connected; false negatives and false positives
  separately; largest = most voxels, ties to the deeper region, then to the false negatives) gets a click
  at its voxel farthest from the region's border — include for a false negative, exclude for a false positive;
* no error left: no more clicks, the Dice stays (a user would stop).

"Farthest from the border" is the exact Euclidean distance in millimetres (the grid's spacing, so thick
slices count as thick); the volume's edge counts as border; ties go to the first voxel in ijk order. The
segmenter sees each click as an ijk voxel index of the volume; Dice is computed on the full volume grid.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli.imaging.volumes import array_ijk, read_image, resample_like
from fastsam3d_cli.training.clicks import distance_inside

REPORTED_CLICKS = (1, 3, 5, 10)
VALIDATION_CT = "abdomen_ct_dicom"
VALIDATION_BRAINS = ("brain1", "brain2")
TRAINING_DATASETS = ("Dataset501_AbdomenCT", "Dataset502_AbdomenMR", "Task503_Colin27")
UNTRAINED_SEED = 2023  # `train`'s default seed: the untrained model is the weights a new run starts from


class Segmenter(Protocol):
    """What the evaluation drives: the `Predictor`'s click interface (ijk clicks, bool ijk masks)."""

    def set_volume(self, volume: sitk.Image) -> None: ...

    def add_click(self, point: Sequence[float], include: bool = True, space: str = "ijk",
                  object: str = "object") -> np.ndarray: ...  # noqa: A002

    def reset_object(self, object: str | None = None) -> None: ...  # noqa: A002


@dataclass
class Method:
    """A named segmenter factory (one segmenter per volume keeps memory flat)."""

    name: str
    make: Callable[[], Segmenter]


@dataclass
class TargetVolume:
    """A volume and its targets: (name, bool ijk mask on the volume grid)."""

    group: str  # "unseen" | "seen"
    source: str  # e.g. "validation/abdomen_ct_dicom", "Dataset501_AbdomenCT/abdomen"
    image: sitk.Image
    targets: list[tuple[str, np.ndarray]]


@dataclass
class TargetResult:
    group: str
    source: str
    name: str
    voxels: int
    dice: dict[str, list[float]] = field(default_factory=dict)  # method → Dice after click 1..N
    clicks: dict[str, list[list[int]]] = field(default_factory=dict)  # method → [i, j, k, include] per click
    seconds: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- clicks
def distance_inside_mm(region: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Exact Euclidean distance (mm) from each voxel of `region` to the nearest voxel outside it; 0 outside.

    The array's edge counts as border (training/clicks.py's `distance_inside`, in millimetres).
    """
    return distance_inside(region, spacing)


def deepest_voxel(region: np.ndarray, spacing: Sequence[float]) -> tuple[tuple[int, int, int], float]:
    """(ijk of the voxel farthest from the region's border — first in ijk order on ties, its distance in mm)."""
    distance = distance_inside_mm(region, spacing)
    flat = int(np.argmax(distance))
    return tuple(int(v) for v in np.unravel_index(flat, region.shape)), float(distance.flat[flat])  # type: ignore[return-value]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (slices) holding every True voxel of `mask`; None when it has none."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _components(region: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected components: (label array, count)."""
    labels = sitk.ConnectedComponent(sitk.GetImageFromArray(region.astype(np.uint8)), False)  # axis order kept
    array = sitk.GetArrayFromImage(labels)
    return array, int(array.max())


def first_click(target: np.ndarray, spacing: Sequence[float]) -> tuple[tuple[int, int, int], bool]:
    """Click 1: include, at the target's voxel farthest from its border."""
    box = bounding_box(target)
    if box is None:
        raise ValueError("the target is empty")
    local, _ = deepest_voxel(target[box], spacing)
    return tuple(int(s.start) + v for s, v in zip(box, local)), True  # type: ignore[return-value]


def next_click(prediction: np.ndarray, target: np.ndarray,
               spacing: Sequence[float]) -> tuple[tuple[int, int, int], bool] | None:
    """The next corrective click (module docstring) or None when prediction == target."""
    box = bounding_box(prediction | target)
    if box is None:
        return None
    pred, true = prediction[box], target[box]
    candidates: list[tuple[int, bool, np.ndarray]] = []  # (voxels, include, component mask)
    for include, error in ((True, true & ~pred), (False, pred & ~true)):
        if not error.any():
            continue
        labels, count = _components(error)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        candidates += [(int(sizes[c]), include, labels == c) for c in np.flatnonzero(sizes == sizes.max())]
    if not candidates:
        return None
    largest = max(size for size, _, _ in candidates)
    best: tuple[tuple[float, int], tuple[int, int, int], bool] | None = None
    for size, include, region in candidates:
        if size != largest:
            continue  # the distance transform only for the largest region(s): it is the cost of a click
        sub = bounding_box(region)
        assert sub is not None
        local, depth = deepest_voxel(region[sub], spacing)
        position = tuple(int(s.start) + v for s, v in zip(sub, local))
        if best is None or (depth, int(include)) > best[0]:
            best = ((depth, int(include)), position, include)  # type: ignore[assignment]
    assert best is not None
    return tuple(int(b.start) + v for b, v in zip(box, best[1])), best[2]  # type: ignore[return-value]


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|); NaN when both are empty."""
    total = int(prediction.sum()) + int(target.sum())
    return math.nan if total == 0 else 2.0 * int(np.logical_and(prediction, target).sum()) / total


def score_target(segmenter: Segmenter, target: np.ndarray, spacing: Sequence[float], clicks: int,
                 object_name: str = "target") -> tuple[list[float], list[list[int]]]:
    """Dice after click 1..`clicks` of one segmenter on one target (the volume is already set)."""
    scores: list[float] = []
    placed: list[list[int]] = []
    click: tuple[tuple[int, int, int], bool] | None = first_click(target, spacing)
    try:
        while click is not None and len(scores) < clicks:
            position, include = click
            prediction = np.asarray(segmenter.add_click(position, include, space="ijk", object=object_name), dtype=bool)
            if prediction.shape != target.shape:
                raise ValueError(f"mask shape {prediction.shape} differs from the target's {target.shape}")
            placed.append([*position, int(include)])
            scores.append(dice(prediction, target))
            click = next_click(prediction, target, spacing) if len(scores) < clicks else None
    finally:
        segmenter.reset_object(object_name)
    scores += [scores[-1]] * (clicks - len(scores))  # no error left: the user stops, the score stays
    return scores, placed


# ------------------------------------------------------------------------------------------ data
def load_validation(data_dir: Path) -> Iterator[TargetVolume]:
    """The unseen volumes of `data_dir/validation`: the CT DICOM series (31 labels) and the two brain lesions."""
    folder = Path(data_dir) / "validation"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / VALIDATION_CT)))
    ct = reader.Execute()
    labels = read_image(folder / f"{VALIDATION_CT}_seg.nii.gz", what="labelmap")
    # Stored with a flipped y axis: resampled by PHYSICAL position onto the series, nearest neighbour.
    label_array = array_ijk(resample_like(labels, ct, "nearest"))
    names = json.loads((folder / f"{VALIDATION_CT}_seg_labels.json").read_text())
    targets = [(str(names[key]), label_array == int(key)) for key in sorted(names, key=int)]
    yield TargetVolume("unseen", f"validation/{VALIDATION_CT}", ct, [(n, m) for n, m in targets if m.any()])
    for brain in VALIDATION_BRAINS:
        image = read_image(folder / f"{brain}_mr.nrrd")
        lesion = resample_like(read_image(folder / f"{brain}_lesion.nrrd", what="labelmap"), image, "nearest")
        yield TargetVolume("unseen", f"validation/{brain}_mr", image, [("lesion", array_ijk(lesion) > 0)])


def select_classes(count: int, limit: int | None) -> list[int]:
    """`limit` class indices spread evenly over `count` (all when limit is None or ≥ count); deterministic."""
    if limit is None or limit >= count:
        return list(range(count))
    if limit <= 0:
        return []
    return sorted({int(round(i * (count - 1) / max(limit - 1, 1))) for i in range(limit)})


def load_training(data_dir: Path, classes_per_dataset: int | None = None,
                  datasets: Sequence[str] = TRAINING_DATASETS) -> Iterator[TargetVolume]:
    """The seen volumes: every case of each training dataset, per class (a spread subset with a limit)."""
    from fastsam3d_cli.data.nnunet import load_raw_dataset

    for name in datasets:
        dataset = load_raw_dataset(Path(data_dir) / name)
        chosen = [dataset.classes[i] for i in select_classes(len(dataset.classes), classes_per_dataset)]
        for case in dataset.cases:
            image = read_image(case.image_path, case.channel_in_file)
            label = array_ijk(resample_like(read_image(case.label_path, what="labelmap"), image, "nearest"))
            targets = [(c.name, np.isin(label, c.values)) for c in chosen]
            yield TargetVolume("seen", f"{name}/{case.case_id}", image, [(n, m) for n, m in targets if m.any()])


# ------------------------------------------------------------------------------------- the run
def evaluate(volumes: Iterator[TargetVolume] | Sequence[TargetVolume], methods: Sequence[Method], clicks: int = 10,
             progress: Callable[[str], None] | None = None) -> list[TargetResult]:
    """Every method on every target of every volume; one segmenter per (method, volume)."""
    results: list[TargetResult] = []
    for volume in volumes:
        spacing = volume.image.GetSpacing()
        rows = [TargetResult(volume.group, volume.source, name, int(mask.sum())) for name, mask in volume.targets]
        for method in methods:
            segmenter = method.make()
            segmenter.set_volume(volume.image)
            for row, (name, mask) in zip(rows, volume.targets):
                start = time.perf_counter()
                row.dice[method.name], row.clicks[method.name] = score_target(segmenter, mask, spacing, clicks, name)
                row.seconds[method.name] = time.perf_counter() - start
                if progress is not None:
                    progress(f"{volume.source} {name}: {method.name} Dice@{clicks} {row.dice[method.name][-1]:.3f} "
                             f"({row.seconds[method.name]:.1f} s)")
            del segmenter
        results.extend(rows)
    return results


def summarise(results: Sequence[TargetResult], methods: Sequence[str], clicks: int) -> dict[str, Any]:
    """Per group and method: mean Dice after each click and the reported Dice@k (NaN targets left out)."""
    summary: dict[str, Any] = {}
    for group in ("unseen", "seen"):
        rows = [r for r in results if r.group == group]
        if not rows:
            continue
        summary[group] = {}
        for method in methods:
            curves = np.array([r.dice[method] for r in rows if method in r.dice], dtype=np.float64)
            mean = [float(np.nanmean(curves[:, k])) for k in range(clicks)] if curves.size else []
            summary[group][method] = {"targets": len(curves), "mean_dice_per_click": mean,
                                      **{f"dice@{k}": mean[k - 1] for k in REPORTED_CLICKS if k <= len(mean)},
                                      "seconds": float(sum(r.seconds.get(method, 0.0) for r in rows))}
    return summary


def markdown_table(results: Sequence[TargetResult], methods: Sequence[str], clicks: int) -> str:
    """One table per group: a row per target and the mean, Dice@1/3/5/10 of each method."""
    ks = [k for k in REPORTED_CLICKS if k <= clicks]
    summary = summarise(results, methods, clicks)
    header = "| target | voxels | " + " | ".join(f"{m} @{k}" for m in methods for k in ks) + " |"
    rule = "|---|---:|" + "---:|" * (len(methods) * len(ks))
    blocks = []
    for group, title in (("unseen", "Unseen (data/validation/, never trained on)"), ("seen", "Seen (training datasets)")):
        rows = [r for r in results if r.group == group]
        if not rows:
            continue
        lines = [f"**{title}**", "", header, rule]
        for row in rows:
            cells = [_fmt(row.dice[m][k - 1]) if m in row.dice else "–" for m in methods for k in ks]
            lines.append(f"| {row.source.split('/', 1)[-1]}: {row.name} | {row.voxels} | " + " | ".join(cells) + " |")
        means = [_fmt(summary[group][m].get(f"dice@{k}", math.nan)) for m in methods for k in ks]
        lines.append(f"| **mean of {len(rows)}** | | " + " | ".join(f"**{v}**" for v in means) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _fmt(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.3f}"


def results_json(results: Sequence[TargetResult], methods: Sequence[str], clicks: int, **meta: Any) -> dict[str, Any]:
    """Everything needed to re-check a number: per target the Dice and the clicks of every method."""
    return {**meta, "clicks": clicks, "methods": list(methods), "summary": summarise(results, methods, clicks),
            "targets": [{"group": r.group, "source": r.source, "name": r.name, "voxels": r.voxels,
                         "dice": r.dice, "clicks": r.clicks, "seconds": r.seconds} for r in results]}


def plot_curves(results: Sequence[TargetResult], methods: Sequence[str], clicks: int, path: Path) -> None:
    """Mean Dice versus clicks, one line per (method, group), via training/plots.py."""
    from fastsam3d_cli.training.plots import plot_dice_per_click

    summary = summarise(results, methods, clicks)
    curves = {f"{m} ({group})": summary[group][m]["mean_dice_per_click"]
              for group in summary for m in methods if summary[group][m]["mean_dice_per_click"]}
    plot_dice_per_click(curves, path, title="Mean Dice vs clicks (unseen = data/validation/)")


# ------------------------------------------------------------------------------------- methods
def classical_method() -> Method:
    from fastsam3d_cli.interactive.classical import ClassicalSegmenter

    return Method("floor", ClassicalSegmenter)


def model_method(name: str, model: Any, max_crops: int | None = None) -> Method:
    """A loaded model through the real `Predictor` on the full volume (the product path)."""
    from fastsam3d_cli.interactive.predictor import DEFAULT_MAX_CROPS, Predictor

    return Method(name, lambda: Predictor(model, max_crops=max_crops or DEFAULT_MAX_CROPS))


def untrained_model(preset: str = "fastsam3d-tiny", seed: int = UNTRAINED_SEED, attention: str = "auto") -> Any:
    """The preset with the seeded initial weights a new `train` run starts from."""
    import torch

    from fastsam3d_cli.model import build_model

    torch.manual_seed(seed)
    return build_model(preset, attention=attention, device="cpu")


def reset_refine_head(model: Any) -> None:
    """Give the model's refine head its initial weights (zero output, so the model returns the floor's region)."""
    from fastsam3d_cli.model.refine_head import RefineHead

    if getattr(model, "refine_head", None) is None:
        raise ValueError("the model has no refine head")
    fresh = RefineHead(model.config.refine_head_widths)
    model.refine_head.load_state_dict(fresh.state_dict())


def checkpoint_model(path: str | Path, attention: str = "auto") -> Any:
    from fastsam3d_cli.model.checkpoint import load_model
    from fastsam3d_cli.model.refine_head import use_inference_layout

    model, _ = load_model(path, device="cpu", attention=attention)
    use_inference_layout(model)  # as `infer` loads it
    return model
