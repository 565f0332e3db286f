#!/usr/bin/env python
"""Probe: can a small learned network that sees the image at full resolution correct the classical floor?

The learned models so far correct the floor through the SAM decoder's 32³ (6 mm) residual, fed by an encoder
that has learned little on two CPU cores; none flipped a voxel (docs/models.md, third session). This probe
asks the question without that encoder: a small 3D conv net (95 k weights) sees, at 1.5 mm on a box
around the clicks,

* the image normalised by the include clicks' own intensity window (the floor's centre and half-width), raw
  and smoothed — click-relative, so the same numbers mean the same thing on CT and MR;
* the floor's region;
* the distance to the nearest include and exclude click;

and predicts the target; its output is a learned multiple of the floor's ±1 plus its own correction (it starts
as the floor). It is trained on the training datasets' volumes only (Dataset501/502: every class with at
least 50 voxels at 1.5 mm), with clicks simulated like the evaluation's (first at the deepest voxel or a
random inner one, the next ones at the centre of the floor's largest error), and scored through the
evaluation's protocol beside the floor on the input grid and the floor on the same 1.5 mm grid.

    python benchmarks/probe_refiner.py train --minutes 50 --out refiner.pt [--threads 1]
    python benchmarks/probe_refiner.py evaluate refiner.pt --sets unseen [--clicks 5] [--out probe]

Not a product model: a yes/no for putting such a head into the model core's decode step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsam3d_cli.interactive.classical import (FloorParameters, click_statistics, components_holding, segment_clicks,
                                                 smoothed)
from fastsam3d_cli.imaging.volumes import array_ijk, image_from_array_ijk, resample_like, resample_onto, resampled_grid
from fastsam3d_cli.training import evaluation as ev

REPO = Path(__file__).resolve().parents[1]
SPACING = 1.5
MARGIN_MM = 40.0  # the box: the clicks' box grown by this (the floor's reach is 20 mm)
TRAIN_BOX = 64  # training boxes are cut to at most this many voxels per axis
CHANNELS = 5


# ------------------------------------------------------------------------------------------ the network
def _block(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=dilation, dilation=dilation),
                         nn.GroupNorm(4, cout), nn.LeakyReLU(0.1))


class Refiner(nn.Module):
    """A three-level 3D U-Net (8/16/32 channels) whose output starts as `skip` × (2·floor − 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = _block(CHANNELS, 8)
        self.e2 = nn.Sequential(nn.Conv3d(8, 16, 2, stride=2), _block(16, 16))
        self.e3 = nn.Sequential(nn.Conv3d(16, 32, 2, stride=2), _block(32, 32), _block(32, 32, dilation=2))
        self.d2 = _block(32 + 16, 16)
        self.d1 = _block(16 + 8, 8)
        self.head = nn.Conv3d(8, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.skip = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.e1(x)
        e2 = self.e2(e1)
        e3 = self.e3(e2)
        d2 = self.d2(torch.cat([F.interpolate(e3, size=e2.shape[2:], mode="trilinear"), e2], 1))
        d1 = self.d1(torch.cat([F.interpolate(d2, size=e1.shape[2:], mode="trilinear"), e1], 1))
        floor = x[:, 2:3]
        return self.head(d1) + self.skip * (2 * floor - 1)


# ------------------------------------------------------------------------------------------ features
def box_around(clicks: Sequence[tuple[int, int, int]], shape: Sequence[int]) -> tuple[slice, ...]:
    """The clicks' box grown by MARGIN_MM, clipped, each side a multiple of 4 where the volume allows."""
    points = np.asarray(clicks)
    margin = int(np.ceil(MARGIN_MM / SPACING))
    lo = np.maximum(points.min(0) - margin, 0)
    hi = np.minimum(points.max(0) + margin + 1, shape)
    out = []
    for a, b, n in zip(lo, hi, shape):
        size = int(b - a)
        want = min(int(np.ceil(size / 4) * 4), int(n) // 4 * 4) if n >= 4 else size
        b2 = min(int(a) + want, int(n))
        a2 = max(b2 - want, 0)
        out.append(slice(a2, b2))
    return tuple(out)


def features(values: np.ndarray, smooth: np.ndarray, box: tuple[slice, ...], region: np.ndarray,
             includes: Sequence[tuple[int, int, int]], excludes: Sequence[tuple[int, int, int]],
             parameters: FloorParameters) -> np.ndarray:
    """(CHANNELS, *box shape) float32: click-normalised raw and smoothed image, floor region, click distances."""
    spacing = np.full(3, SPACING)
    centres, halves = [], []
    around = smooth[box]
    low, high = np.percentile(around, [1.0, 99.0])
    span = max(float(high - low), 1e-6)
    for click in includes:
        centre, spread = click_statistics(smooth, values, spacing, click, parameters.sample_mm)
        centres.append(centre)
        halves.append(max(parameters.window_k * spread, parameters.min_window_fraction * span))
    centre, half = float(np.median(centres)), float(np.median(halves))
    shape = tuple(s.stop - s.start for s in box)
    lo = np.asarray([s.start for s in box])
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), 0)

    def proximity(clicks: Sequence[tuple[int, int, int]]) -> np.ndarray:
        if not clicks:
            return np.zeros(shape, np.float32)
        best = np.full(shape, np.inf, np.float32)
        for c in clicks:
            d = np.sqrt(((grid - (np.asarray(c) - lo)[:, None, None, None]) ** 2).sum(0)) * SPACING
            best = np.minimum(best, d)
        return np.exp(-best / 15.0).astype(np.float32)

    out = np.empty((CHANNELS, *shape), np.float32)
    out[0] = np.clip((values[box] - centre) / half, -6, 6) / 3
    out[1] = np.clip((smooth[box] - centre) / half, -6, 6) / 3
    out[2] = region[box]
    out[3] = proximity(includes)
    out[4] = proximity(excludes)
    return out


# ------------------------------------------------------------------------------------------ segmenters
class GridSegmenter:
    """The evaluation's click interface on a 1.5 mm copy of the volume; masks go back nearest-neighbour.

    With `refiner=None` it is the floor on that grid (the refiner's own yardstick)."""

    def __init__(self, refiner: Refiner | None = None, parameters: FloorParameters | None = None) -> None:
        self.refiner, self.parameters = refiner, parameters or FloorParameters()
        self.clicks: dict[str, list[tuple[tuple[int, int, int], bool]]] = {}

    def set_volume(self, volume: sitk.Image) -> None:
        self.native = volume
        size, spacing, origin, direction = resampled_grid(volume, SPACING)
        floating = sitk.Cast(volume, sitk.sitkFloat32)
        self.grid = resample_onto(floating, size=size, spacing=spacing, origin=origin, direction=direction,
                                  interpolation="linear", extrapolate=True)
        self.values = array_ijk(self.grid, np.float32)
        self.smooth = smoothed(self.values, np.full(3, SPACING), self.parameters.smoothing_mm)
        self.clicks.clear()

    def reset_object(self, object: str | None = None) -> None:  # noqa: A002
        if object is None:
            self.clicks.clear()
        else:
            self.clicks.pop(object, None)

    def add_click(self, point: Sequence[float], include: bool = True, space: str = "ijk",
                  object: str = "object") -> np.ndarray:  # noqa: A002
        physical = self.native.TransformContinuousIndexToPhysicalPoint([float(v) for v in point])
        index = np.rint(self.grid.TransformPhysicalPointToContinuousIndex(physical)).astype(int)
        index = tuple(int(v) for v in np.clip(index, 0, np.asarray(self.values.shape) - 1))
        self.clicks.setdefault(object, []).append((index, bool(include)))
        mask = predict(self.refiner, self.values, self.smooth, self.clicks[object], self.parameters)
        back = resample_like(image_from_array_ijk(mask.astype(np.uint8), self.grid), self.native, "nearest")
        return array_ijk(back) > 0


def predict(refiner: Refiner | None, values: np.ndarray, smooth: np.ndarray,
            clicks: Sequence[tuple[tuple[int, int, int], bool]], parameters: FloorParameters) -> np.ndarray:
    """The floor's region, corrected by the refiner on the clicks' box when one is given (bool, grid shape)."""
    includes = [c for c, inc in clicks if inc]
    excludes = [c for c, inc in clicks if not inc]
    region = segment_clicks(values, smooth, np.full(3, SPACING), includes, excludes, parameters)
    if refiner is None or not includes:
        return region
    box = box_around([c for c, _ in clicks], values.shape)
    x = torch.from_numpy(features(values, smooth, box, region, includes, excludes, parameters))[None]
    with torch.no_grad():
        inside = (refiner(x)[0, 0] > 0).numpy()
    out = np.zeros(values.shape, bool)
    out[box] = inside
    for c in includes:
        out[c] = True
    for c in excludes:
        out[c] = False
    return components_holding(out, includes)  # like the floor: the components that hold an include click


# ------------------------------------------------------------------------------------------ training
def training_pairs(data_dir: Path, min_voxels: int = 50) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(values, smooth, target) at 1.5 mm for every (case, class) of the abdominal training datasets."""
    pairs = []
    for volume in ev.load_training(data_dir, None, datasets=("Dataset501_AbdomenCT", "Dataset502_AbdomenMR")):
        seg = GridSegmenter()
        seg.set_volume(volume.image)
        for name, mask in volume.targets:
            on_grid = array_ijk(resample_like(image_from_array_ijk(mask.astype(np.uint8), volume.image),
                                              seg.grid, "nearest")) > 0
            if on_grid.sum() >= min_voxels:
                pairs.append((seg.values, seg.smooth, on_grid))
    return pairs


def simulate_clicks(rng: np.random.Generator, values: np.ndarray, smooth: np.ndarray, target: np.ndarray,
                    parameters: FloorParameters, model: Refiner | None = None) -> list[tuple[tuple[int, int, int], bool]]:
    """1–5 clicks: the first deepest (half the time) or random inside weighted by depth², then at the centre of
    the largest error of the floor (model None) or of the refiner being trained (as the evaluation will)."""
    spacing = np.full(3, SPACING)
    if rng.random() < 0.5:
        first, _ = ev.first_click(target, spacing)
    else:
        box = ev.bounding_box(target)
        depth = ev.distance_inside_mm(target[box], spacing).ravel() ** 2
        pick = rng.choice(depth.size, p=depth / depth.sum())
        first = tuple(int(s.start) + int(v) for s, v in zip(box, np.unravel_index(pick, target[box].shape)))
    clicks = [(first, True)]
    for _ in range(int(rng.integers(0, 5))):
        if model is None:
            includes = [c for c, inc in clicks if inc]
            excludes = [c for c, inc in clicks if not inc]
            region = segment_clicks(values, smooth, spacing, includes, excludes, parameters)
        else:
            region = predict(model, values, smooth, clicks, parameters)
        nxt = ev.next_click(region, target, spacing)
        if nxt is None:
            break
        clicks.append(nxt)
    return clicks


def cut_box(box: tuple[slice, ...], rng: np.random.Generator, clicks: Sequence[tuple[int, int, int]]) -> tuple[slice, ...]:
    """At most TRAIN_BOX per axis: a random window of the box that holds the last click."""
    out = []
    for axis, s in enumerate(box):
        size = s.stop - s.start
        if size <= TRAIN_BOX:
            out.append(s)
            continue
        last = clicks[-1][axis]
        lo_min, lo_max = max(s.start, last - TRAIN_BOX + 1), min(s.stop - TRAIN_BOX, last)
        start = int(rng.integers(lo_min, lo_max + 1)) if lo_max >= lo_min else s.start
        out.append(slice(start, start + TRAIN_BOX))
    return tuple(out)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def train(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    parameters = FloorParameters()
    pairs = training_pairs(args.data_dir)
    print(f"{len(pairs)} (case, class) pairs at {SPACING} mm", file=sys.stderr)
    shapes = None
    if args.shapes > 0:
        from fastsam3d_cli.data.synthetic import ShapesSource

        shapes, generator = ShapesSource(), torch.Generator().manual_seed(args.seed)
    model = Refiner()
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    step = 0
    if args.resume and args.out.exists():
        saved = torch.load(args.out, weights_only=True)
        model.load_state_dict(saved["model"])
        if "optimiser" in saved:
            optimiser.load_state_dict(saved["optimiser"])
        step = int(saved["step"])
        rng = np.random.default_rng([args.seed, step])  # a resumed run draws new samples
        torch.manual_seed(args.seed + step)
        if shapes is not None:
            generator.manual_seed(args.seed + step)
    start, history = time.perf_counter(), []
    log = open(args.out.with_suffix(".log"), "a")
    while time.perf_counter() - start < args.minutes * 60:
        if shapes is not None and rng.random() < args.shapes:
            sample = shapes.sample(generator)
            values = sample["image"][0].numpy()
            smooth = smoothed(values, np.full(3, SPACING), parameters.smoothing_mm)
            target = sample["label"][0].numpy() > 0.5
        else:
            values, smooth, target = pairs[int(rng.integers(len(pairs)))]
        own = step >= args.own_clicks_after and rng.random() < 0.5
        if own:
            model.eval()
        clicks = simulate_clicks(rng, values, smooth, target, parameters, model if own else None)
        model.train()
        includes = [c for c, inc in clicks if inc]
        excludes = [c for c, inc in clicks if not inc]
        region = segment_clicks(values, smooth, np.full(3, SPACING), includes, excludes, parameters)
        box = cut_box(box_around([c for c, _ in clicks], values.shape), rng, [c for c, _ in clicks])
        x = features(values, smooth, box, region, includes, excludes, parameters)
        if rng.random() < 0.5:  # intensity sign flip of the normalised image: contrast polarity is not a cue
            x[:2] = -x[:2]
        flips = [a for a in range(3) if rng.random() < 0.5]
        y = target[box].astype(np.float32)
        if flips:
            x = np.flip(x, [a + 1 for a in flips]).copy()
            y = np.flip(y, flips).copy()
        logits = model(torch.from_numpy(x)[None])
        loss = loss_fn(logits[0, 0], torch.from_numpy(y))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            pred = (logits[0, 0] > 0).numpy()
            d_model = ev.dice(pred, y > 0)
            d_floor = ev.dice(x[2] > 0.5, y > 0)
        history.append((loss.item(), d_model, d_floor))
        step += 1
        if step % 50 == 0:
            recent = np.nanmean(np.asarray(history[-50:]), axis=0)
            line = (f"step {step} {time.perf_counter() - start:.0f}s loss {recent[0]:.4f} dice {recent[1]:.4f} "
                    f"floor {recent[2]:.4f} skip {model.skip.item():.3f}")
            print(line, file=log, flush=True)
            torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step}, args.out)
    torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step}, args.out)
    print(f"{step} steps; saved {args.out}", file=sys.stderr)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    import functools

    model = Refiner()
    model.load_state_dict(torch.load(args.model, weights_only=True)["model"])
    model.eval()
    methods = [ev.classical_method(),
               ev.Method("floor 1.5 mm", GridSegmenter),
               ev.Method("refiner", functools.partial(GridSegmenter, model))]
    names = [m.name for m in methods]
    rows = []
    for group in args.sets.split(","):
        volumes = (ev.load_validation(args.data_dir) if group == "unseen" else
                   ev.load_training(args.data_dir, 8, datasets=("Dataset501_AbdomenCT", "Dataset502_AbdomenMR")))
        results = ev.evaluate(volumes, methods, clicks=args.clicks,
                              progress=lambda line: print(line, file=sys.stderr))
        rows += results
    table = ev.markdown_table(rows, names, args.clicks)
    print(table)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(table)
        Path(args.out).with_suffix(".json").write_text(json.dumps(ev.results_json(rows, names, args.clicks), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("FASTSAM3D_DATA_DIR", REPO.parent / "shared" / "data")))
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--minutes", type=float, default=50)
    t.add_argument("--out", type=Path, default=Path("refiner.pt"))
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=2026)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--shapes", type=float, default=0.0,
                   help="share of samples drawn from the procedural scenes of `data.shapes` (default 0)")
    t.add_argument("--own-clicks-after", type=int, default=300,
                   help="from this step on, half the samples place clicks 2..5 on the refiner's own errors")
    e = sub.add_parser("evaluate")
    e.add_argument("model", type=Path)
    e.add_argument("--sets", default="unseen")
    e.add_argument("--clicks", type=int, default=5)
    e.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return train(args) if args.command == "train" else evaluate(args)


if __name__ == "__main__":
    raise SystemExit(main())
