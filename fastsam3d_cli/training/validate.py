"""`validate`: Dice and IoU after each simulated click, per (case, class), as in the papers' evaluation.

For every prepared (case, class) (reference/models.md §6): canonical orientation, the 128³ crop centred on
the label (no shift, no flip), z-normalised over voxels > 0; encode once; then click k = 1..N: the next
simulated click (ritm for clicks 1–2, random from click 3, seeded per case), decoded with only that new
point plus the previous low-res logits (zeros before click 1); Dice and IoU of sigmoid > 0.5 against the
label on the crop. Dice is NaN when both masks are empty (never the case for a non-empty label).

Reported per class and overall (mean over all (case, class) pairs): Dice@1, @3, @5, @10 (those ≤ N) and
the papers' summary "mean of per-case best Dice" (mean over pairs of the maximum over clicks).
"""
from __future__ import annotations

import csv
import io
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fastsam3d_cli.training.clicks import clicks_to_prompt, simulate_click, validation_click_method
from fastsam3d_cli.interactive.prior import PriorSettings, decode_step
from fastsam3d_cli.training.train import ClassicalPriorBatch
from fastsam3d_cli.errors import BadInputError, UsageError
from fastsam3d_cli.training.losses import dice_score, iou_score

REPORTED_CLICKS = (1, 3, 5, 10)
DEFAULT_CLICKS = 10
DEFAULT_SEED = 2023

ProgressCallback = Callable[[int, int, str], None]  # (pairs done, total, what just finished)


@dataclass
class CaseScores:
    """Per-click scores of one (case, class); lists are indexed by click number − 1."""

    dataset: str
    case: str
    class_name: str
    dice: list[float]
    iou: list[float]
    clicks: list[tuple[tuple[int, int, int], int]]  # (position in the crop, label) per click

    @property
    def best_dice(self) -> float:
        finite = [d for d in self.dice if not math.isnan(d)]
        return max(finite) if finite else math.nan


@dataclass
class ValidationResult:
    checkpoint: str
    preset: str
    device: str
    clicks: int
    seed: int
    scores: list[CaseScores]
    skipped: list[str] = field(default_factory=list)
    csv_path: Path | None = None
    plot_path: Path | None = None
    wall_s: float = 0.0

    @property
    def reported_clicks(self) -> list[int]:
        return [k for k in REPORTED_CLICKS if k <= self.clicks]

    def classes(self) -> list[str]:
        return sorted({s.class_name for s in self.scores})

    def summary(self, scores: Sequence[CaseScores]) -> dict[str, Any]:
        """Dice@k, IoU@k, mean best Dice and the mean Dice curve over a group of (case, class) pairs."""
        dice = np.array([s.dice for s in scores], dtype=np.float64)
        iou = np.array([s.iou for s in scores], dtype=np.float64)
        return {"cases": len(scores),
                "dice_at": {str(k): _nanmean(dice[:, k - 1]) for k in self.reported_clicks},
                "iou_at": {str(k): _nanmean(iou[:, k - 1]) for k in self.reported_clicks},
                "mean_best_dice": _nanmean(np.array([s.best_dice for s in scores])),
                "dice_per_click": [_nanmean(dice[:, k]) for k in range(self.clicks)]}

    def per_class(self) -> dict[str, dict[str, Any]]:
        return {name: self.summary([s for s in self.scores if s.class_name == name]) for name in self.classes()}

    def overall(self) -> dict[str, Any]:
        return self.summary(self.scores)

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "model": self.preset, "device": self.device, "clicks": self.clicks,
                "seed": self.seed, "click_protocol": "ritm for clicks 1-2, random from click 3",
                "overall": self.overall(), "classes": self.per_class(), "skipped": self.skipped,
                "cases": [{"dataset": s.dataset, "case": s.case, "class": s.class_name, "dice": s.dice, "iou": s.iou,
                           "best_dice": s.best_dice} for s in self.scores],
                "csv": str(self.csv_path) if self.csv_path else None,
                "plot": str(self.plot_path) if self.plot_path else None, "wall_s": round(self.wall_s, 2)}


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


# ---------------------------------------------------------------------------------------- one pair
def case_seed(seed: int, dataset: str, case: str, class_name: str) -> list[int]:
    """A per-pair seed, so a pair's clicks do not depend on which other pairs are validated."""
    return [int(seed), zlib.crc32(f"{dataset}/{case}/{class_name}".encode("utf-8"))]


@torch.no_grad()
def score_crop(model: torch.nn.Module, image: np.ndarray, label: np.ndarray, valid: np.ndarray | None,
               clicks: int, rng: np.random.Generator) -> tuple[list[float], list[float], list]:
    """Dice and IoU after each of `clicks` simulated clicks on one z-normalised 128³ crop.

    Returns empty lists when the crop's label is empty (nothing to click: the caller skips the pair).
    """
    device = model.device
    target = torch.from_numpy(np.ascontiguousarray(label)).to(device)
    valid_t = None if valid is None else torch.from_numpy(np.ascontiguousarray(valid)).to(device)
    if not bool(target.any()):
        return [], [], []
    volume = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
    embedding = model.encode(volume)
    low = model.config.low_res_size
    low_res = torch.zeros((1, 1, low, low, low), device=device, dtype=embedding.dtype)
    prediction = torch.zeros_like(target, dtype=torch.bool)
    settings = PriorSettings.from_dict(getattr(model, "prior_settings", None))
    prior = None if settings is None else ClassicalPriorBatch(volume, settings, torch.tensor(settings.gate),
                                                              refine_head=getattr(model, "refine_head", None))
    dice, iou, made = [], [], []
    for number in range(1, clicks + 1):
        click = simulate_click(validation_click_method(number), prediction, target, rng, valid_t)
        points, labels = clicks_to_prompt([click], device)
        if prior is None:
            low_res, _ = model.decode(embedding, points, labels, low_res)
            logits = model.upsample_logits(low_res)
        else:  # a model that corrects the classical prior: as it was trained (interactive/prior.py)
            prior.add([click])
            low_res, logits = decode_step(model, embedding, points, labels, prior.logits(), low_res, prior.gate)
        prediction = logits[0, 0] > 0
        dice.append(dice_score(prediction, target, valid_t))
        iou.append(iou_score(prediction, target, valid_t))
        made.append((click.position, click.label) if click is not None else None)
    return dice, iou, made


# ---------------------------------------------------------------------------------------------- API
def validate(prepared_dirs: Sequence[str | Path] | str | Path, checkpoint: str | Path, model: str | None = None, *,
             clicks: int = DEFAULT_CLICKS, seed: int = DEFAULT_SEED, device: str = "auto", attention: str = "auto",
             classes: Sequence[str] | None = None, csv_path: str | Path | None = None,
             plot_path: str | Path | None = None, overwrite: bool = False,
             progress: ProgressCallback | None = None) -> ValidationResult:
    """Validate a checkpoint on prepared folders (see the module docstring); optionally write a CSV and a PNG.

    Errors before any work: clicks < 1 → UsageError (2); empty/wrong-layout data, an existing output without
    `overwrite`, an unwritable output folder → BadInputError (3); a checkpoint that is missing, corrupt or
    of another model → WeightsError (4).
    """
    from fastsam3d_cli.imaging.atomic import check_output_path
    from fastsam3d_cli.device import check_attention_name, check_device_spec, resolve_device
    from fastsam3d_cli.model.checkpoint import load_model
    from fastsam3d_cli.data.prepared import list_prepared_samples
    from fastsam3d_cli.data.training_data import load_sample, validation_crop

    started = time.monotonic()
    if clicks < 1:
        raise UsageError(f"--clicks must be at least 1 (got {clicks})", "give the number of simulated clicks, e.g. 10")
    check_attention_name(attention)  # usage errors before the data, output and checkpoint checks
    check_device_spec(device)
    if model is not None:
        from fastsam3d_cli.model.config import get_config

        get_config(model)
    folders = [prepared_dirs] if isinstance(prepared_dirs, (str, Path)) else list(prepared_dirs)
    samples = [s for folder in folders for s in list_prepared_samples(Path(folder), classes=classes)]
    csv_file = check_output_path(Path(csv_path), overwrite, "CSV output", "--csv") if csv_path is not None else None
    if plot_path is not None and not str(plot_path).lower().endswith(".png"):
        raise UsageError(f"--plot {plot_path} must end in .png", "e.g. --plot dice.png")
    plot_file = check_output_path(Path(plot_path), overwrite, "plot output", "--plot") if plot_path is not None else None
    if csv_file is not None and csv_file == plot_file:
        raise UsageError("--csv and --plot name the same file", "give two different files")
    torch_device = resolve_device(device)
    network, info = load_model(checkpoint, preset=model, device=torch_device, attention=attention)
    result = ValidationResult(str(checkpoint), str(info.preset), str(torch_device), int(clicks), int(seed), [])
    for index, sample in enumerate(samples):
        name = f"{sample.dataset}/{sample.case}/{sample.class_name}"
        crop = validation_crop(load_sample(sample))
        scored = None
        if crop is not None:
            rng = np.random.default_rng(case_seed(seed, sample.dataset, sample.case, sample.class_name))
            dice, iou, made = score_crop(network, crop.image, crop.label, crop.valid, clicks, rng)
            if dice:
                scored = CaseScores(sample.dataset, sample.case, sample.class_name, dice, iou, made)
        if scored is None:
            result.skipped.append(f"{name}: empty label, nothing to click — skipped")
        else:
            result.scores.append(scored)
        if progress is not None:
            progress(index + 1, len(samples), name)
    if not result.scores:
        raise BadInputError(f"no (case, class) with a non-empty label among {len(samples)} prepared sample(s)",
                            "check the prepared folder (fastsam3d prepare never writes empty labels)")
    if csv_file is not None:
        write_scores_csv(result, csv_file)
        result.csv_path = csv_file
    if plot_file is not None:
        from fastsam3d_cli.training.plots import plot_dice_per_click

        curves = {name: summary["dice_per_click"] for name, summary in result.per_class().items()}
        curves["overall"] = result.overall()["dice_per_click"]
        plot_dice_per_click(curves, plot_file, title=f"{result.preset}: Dice vs clicks ({len(result.scores)} pairs)")
        result.plot_path = plot_file
    result.wall_s = time.monotonic() - started
    return result


def write_scores_csv(result: ValidationResult, path: Path) -> None:
    """One row per (case, class): dice_1..dice_N, iou_1..iou_N, best_dice (atomic write)."""
    from fastsam3d_cli.imaging.atomic import write_text_atomic

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "case", "class"] + [f"dice_{k}" for k in range(1, result.clicks + 1)]
                    + [f"iou_{k}" for k in range(1, result.clicks + 1)] + ["best_dice"])
    for s in result.scores:
        writer.writerow([s.dataset, s.case, s.class_name] + [_fmt(v) for v in s.dice] + [_fmt(v) for v in s.iou]
                        + [_fmt(s.best_dice)])
    write_text_atomic(path, buffer.getvalue())


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.6f}"
