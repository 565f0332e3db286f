#!/usr/bin/env python
"""The classical floor with other settings, through the evaluation's click protocol: how much a choice of the
floor's own knobs could buy (docs/models.md, third session).

    python benchmarks/floor_settings.py --reach 20,40,80 --sets unseen,seen [--clicks 5]

Prints the mean Dice per click for each `reach_mm` value (20 is the floor's default), per target Dice at the
last click, and the mean of the per-target best (an oracle that knows the right reach for each target).
Nothing is written.
"""
from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import numpy as np

from fastsam3d_cli.interactive.classical import ClassicalSegmenter, FloorParameters
from fastsam3d_cli.training import evaluation as ev

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("FASTSAM3D_DATA_DIR", REPO.parent / "shared" / "data")))
    parser.add_argument("--reach", default="20,40,80", help="comma-separated reach_mm values (default 20,40,80)")
    parser.add_argument("--sets", default="unseen,seen", help="unseen, seen or both")
    parser.add_argument("--seen-classes", type=int, default=8, help="classes per training dataset (0 = all)")
    parser.add_argument("--clicks", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reaches = [float(value) for value in args.reach.split(",") if value.strip()]
    methods = [ev.Method(f"reach {r:g} mm", functools.partial(ClassicalSegmenter, FloorParameters(reach_mm=r)))
               for r in reaches]
    names = [m.name for m in methods]
    for group in [g.strip() for g in args.sets.split(",") if g.strip()]:
        if group == "unseen":
            volumes = ev.load_validation(args.data_dir)
        else:
            volumes = ev.load_training(args.data_dir, args.seen_classes or None)
        results = ev.evaluate(volumes, methods, clicks=args.clicks)
        summary = ev.summarise(results, names, args.clicks)[group]
        print(f"## {group}: mean Dice per click")
        for name in names:
            print(f"{name:>14}: " + " ".join(f"{d:.3f}" for d in summary[name]["mean_dice_per_click"]))
        print(f"## {group}: Dice@{args.clicks} per target")
        best = []
        for row in results:
            last = [row.dice[name][-1] for name in names]
            best.append(max(last))
            print(f"{row.source[:28]:28s} {row.name[:28]:28s} {row.voxels:>8d} " + " ".join(f"{d:.3f}" for d in last))
        print(f"mean of the per-target best: {np.nanmean(best):.3f} over {len(best)} targets\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
