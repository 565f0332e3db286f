#!/usr/bin/env python
"""Does a prior model's correction separate the floor's wrong voxels from its right ones? A probe on training crops.

A model trained with `--prior classical` outputs logits P + upsample(gate × M): the classical floor's ±scale
region plus a learned residual (fastsam3d_cli/interactive/prior.py). Before a run is continued for hours, this
says on prepared training crops whether M is learning corrections (high on the voxels the floor missed, low on
the ones it wrongly took) or only an offset, and how many voxels it actually flips:

    python benchmarks/probe_correction.py runs/prior/last.pth --prepared runs/prepared [--abdomen] [--clicks 3]

Per crop (centred on the label, no augmentation, RITM-style clicks from the label): the mean of upsample(gate × M)
on the floor's false negatives (FN), true negatives (TN), true positives (TP) and false positives (FP), then the
totals: voxels flipped in each class and the Dice of the floor and of the model. A correction that helps has
FN well above TN and FP well below TP, and flips more FN/FP voxels than TP/TN ones. Nothing is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fastsam3d_cli.data.prepared import list_prepared_samples
from fastsam3d_cli.data.training_data import load_sample, validation_crop
from fastsam3d_cli.interactive.prior import PriorSettings, decode_step
from fastsam3d_cli.model.checkpoint import load_model
from fastsam3d_cli.training.clicks import clicks_to_prompt, simulate_click
from fastsam3d_cli.training.train import ClassicalPriorBatch

CLASSES = ("FN", "TN", "TP", "FP")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint trained with --prior classical")
    parser.add_argument("--prepared", type=Path, required=True, help="a folder written by fastsam3d prepare")
    parser.add_argument("--abdomen", action="store_true",
                        help="only classes whose names start in lower case (the abdominal datasets, not Colin27)")
    parser.add_argument("--samples", type=int, default=12, help="crops to probe, spread over the list (default 12)")
    parser.add_argument("--clicks", type=int, default=3, help="clicks per crop (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def voxel_classes(truth: torch.Tensor, prior_inside: torch.Tensor) -> dict[str, torch.Tensor]:
    """The floor's confusion classes as boolean masks."""
    return {"FN": truth & ~prior_inside, "TN": ~truth & ~prior_inside, "TP": truth & prior_inside,
            "FP": ~truth & prior_inside}


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int((a & b).sum()) / total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.checkpoint)
    settings = PriorSettings.from_dict(getattr(model, "prior_settings", None), str(args.checkpoint))
    if settings is None:
        print(f"{args.checkpoint} was not trained with a prior", file=sys.stderr)
        return 2
    samples = list_prepared_samples(args.prepared)
    if args.abdomen:
        samples = [s for s in samples if not s.class_name[:1].isupper()]
    step = max(1, len(samples) // max(1, args.samples))
    samples = samples[::step][:args.samples]
    rng = np.random.default_rng(args.seed)
    flipped = {name: 0 for name in CLASSES}
    counted = {name: 0 for name in CLASSES}
    floor_dice, model_dice = [], []
    print(f"{args.checkpoint}: scale {settings.scale}, gate {settings.gate:.3f}; mean residual per floor class")
    with torch.no_grad():
        for sample in samples:
            crop = validation_crop(load_sample(sample))
            if crop is None:
                continue
            image = torch.from_numpy(crop.image)[None, None]
            target = torch.from_numpy(crop.label)
            embedding = model.encode(image)
            prior = ClassicalPriorBatch(image, settings, torch.tensor(settings.gate))
            residual, prediction = None, torch.zeros_like(target, dtype=torch.bool)
            for _ in range(args.clicks):
                click = simulate_click("ritm", prediction, target, rng, None)
                prior.add([click])
                prior_logits = prior.logits()
                points, labels = clicks_to_prompt([click])
                residual, logits = decode_step(model, embedding, points, labels, prior_logits, residual, settings.gate)
                prediction = logits[0, 0] > 0
            correction = model.upsample_logits(residual)[0, 0]
            truth, inside = target > 0.5, prior_logits[0, 0] > 0
            masks = voxel_classes(truth, inside)
            means = {name: float(correction[mask].mean()) if mask.any() else float("nan") for name, mask in masks.items()}
            for name, mask in masks.items():
                counted[name] += int(mask.sum())
                flipped[name] += int((mask & (prediction != inside)).sum())
            floor_dice.append(dice(inside, truth))
            model_dice.append(dice(prediction, truth))
            print(f"  {sample.class_name[:24]:24s} " + " ".join(f"{n} {means[n]:+.3f}" for n in CLASSES)
                  + f"  Dice floor {floor_dice[-1]:.3f} model {model_dice[-1]:.3f}")
    print("flipped: " + ", ".join(f"{n} {flipped[n]}/{counted[n]}" for n in CLASSES)
          + f"; mean Dice floor {np.nanmean(floor_dice):.4f} model {np.nanmean(model_dice):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
