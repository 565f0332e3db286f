"""`train --refine-head`: train a prior model's refine head alone, on simulated clicks at full resolution.

The refine head (model/refine_head.py) corrects the classical floor's region on the clicks' box
(interactive/refine.py). Training it does not need the image encoder: per sample (a 128³ crop at 1.5 mm of a
prepared (case, class), or of a generated source when `--data-mix` asks for it),

1. clicks are simulated as the evaluation places them (training/evaluation.py): the first include click at
   the target's deepest voxel (half the samples) or at a random inner voxel weighted by depth², then 0–4
   more, each at the deepest voxel of the largest error region of the floor — or, from step
   `own_clicks_after` on and for `own_clicks_share` of the samples, of the head being trained (the errors it
   will be corrected on at inference);
2. the floor's region from all clicks, the box around them cut to at most `TRAIN_BOX`³ around the last click,
   the head's features (`interactive.refine.features`);
3. augmentation: the normalised image's sign flipped (contrast polarity is not a cue) and each axis flipped,
   each with probability 1/2;
4. loss: binary cross-entropy + soft Dice of the head's logits against the target on the box.

Everything else (optimizer, schedule, checkpoints, resume, logs) is `trainer.Trainer`'s. Only `refine_head.*`
has gradients; the rest of the model is saved as it is (a new run: the SAM residual zeroed, so the model is
exactly floor + head, see interactive/prior.py). Epoch records carry "dice" (the head's, on the boxes) beside
"floor_dice" (the floor's on the same boxes).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fastsam3d_cli.errors import UsageError
from fastsam3d_cli.imaging.crops import MODEL_SPACING_MM
from fastsam3d_cli.interactive.prior import CropPrior, PriorSettings
from fastsam3d_cli.interactive.refine import box_around, features
from fastsam3d_cli.training import evaluation as ev
from fastsam3d_cli.training.losses import dice_ce_loss
from fastsam3d_cli.training.trainer import StepContext, TrainingTask, check_preset

TRAIN_BOX = 64  # training boxes are cut to at most this many voxels per axis (cost; inference uses the whole box)
MAX_EXTRA_CLICKS = 4
OWN_CLICKS_AFTER = 300
OWN_CLICKS_SHARE = 0.5

Click = tuple[tuple[int, int, int], bool]


def first_click(target: np.ndarray, rng: np.random.Generator, spacing_mm: float) -> tuple[int, int, int]:
    """The deepest voxel (p = 1/2) or a random inner voxel weighted by its depth² (mm)."""
    spacing = np.full(3, spacing_mm)
    if rng.random() < 0.5:
        return ev.first_click(target, spacing)[0]
    box = ev.bounding_box(target)
    assert box is not None
    depth = ev.distance_inside_mm(target[box], spacing).ravel().astype(np.float64) ** 2
    pick = int(rng.choice(depth.size, p=depth / depth.sum()))
    return tuple(int(s.start) + int(v) for s, v in zip(box, np.unravel_index(pick, target[box].shape)))  # type: ignore[return-value]


def cut_box(box: tuple[slice, ...], last_click: Sequence[int], rng: np.random.Generator,
            size: int = TRAIN_BOX) -> tuple[slice, ...]:
    """At most `size` voxels per axis: a random window of `box` that holds the last click."""
    out = []
    for s, position in zip(box, last_click):
        if s.stop - s.start <= size:
            out.append(s)
            continue
        low, high = max(s.start, int(position) - size + 1), min(s.stop - size, int(position))
        start = int(rng.integers(low, high + 1)) if high >= low else s.start
        out.append(slice(start, start + size))
    return tuple(out)


class RefineHeadTask(TrainingTask):
    """Trains `model.refine_head` on the floor's errors (module docstring); the `TrainingTask` of --refine-head."""

    name = "train"
    best_metric = "dice"
    best_mode = "max"

    def __init__(self, model: nn.Module, dataset: Any, prior: PriorSettings,
                 own_clicks_after: int = OWN_CLICKS_AFTER, own_clicks_share: float = OWN_CLICKS_SHARE,
                 spacing_mm: float = MODEL_SPACING_MM) -> None:
        if getattr(model, "refine_head", None) is None:
            raise UsageError(f"model '{model.config.name}' has no refine head",
                             "train --refine-head with --model fastsam3d-tiny-refine")
        self.model, self.dataset, self.prior = model, dataset, prior
        self.own_clicks_after, self.own_clicks_share = int(own_clicks_after), float(own_clicks_share)
        self.spacing_mm = float(spacing_mm)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("refine_head."))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.model.refine_head.parameters()), "lr": lr, "name": "refine_head"}]

    def simulate_clicks(self, crop: CropPrior, target: np.ndarray, rng: np.random.Generator,
                        own_errors: bool) -> list[Click]:
        """The first click, then up to MAX_EXTRA_CLICKS at the largest error of the floor (or of the head)."""
        spacing = np.full(3, self.spacing_mm)
        clicks: list[Click] = [(first_click(target, rng, self.spacing_mm), True)]
        for _ in range(int(rng.integers(0, MAX_EXTRA_CLICKS + 1))):
            if own_errors:
                self.model.refine_head.eval()
                prediction = crop.logits(clicks, self.prior.scale, self.model.refine_head) > 0
                self.model.refine_head.train()
            else:
                prediction = crop.region(clicks)
            click = ev.next_click(prediction, target, spacing)
            if click is None:
                break
            clicks.append(click)
        return clicks

    def sample(self, image: np.ndarray, target: np.ndarray, valid: np.ndarray | None, rng: np.random.Generator,
               own_errors: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(features, target, weight) on one training box, or None for an empty target."""
        if not target.any():
            return None
        crop = CropPrior(image, self.spacing_mm)
        clicks = self.simulate_clicks(crop, target, rng, own_errors)
        region = crop.region(clicks)
        includes = [c for c, include in clicks if include]
        excludes = [c for c, include in clicks if not include]
        box = cut_box(box_around([c for c, _ in clicks], image.shape, self.spacing_mm), clicks[-1][0], rng)
        x = features(crop.values, crop.smooth, region, includes, excludes, box, self.spacing_mm, crop.parameters)
        y = target[box].astype(np.float32)
        w = np.ones_like(y) if valid is None else valid[box].astype(np.float32)
        if rng.random() < 0.5:
            x[:2] = -x[:2]
        flips = [axis for axis in range(3) if rng.random() < 0.5]
        if flips:
            x = np.flip(x, [a + 1 for a in flips])
            y, w = np.flip(y, flips), np.flip(w, flips)
        return np.ascontiguousarray(x), np.ascontiguousarray(y), np.ascontiguousarray(w)

    def step(self, batch: Mapping[str, Any], context: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        rng = context.rng()
        images = batch["image"].detach().float().cpu().numpy()
        targets = batch["label"].detach().cpu().numpy() > 0.5
        valid = batch.get("valid")
        valid_np = None if valid is None else valid.detach().cpu().numpy() > 0.5
        head = self.model.refine_head
        device = next(head.parameters()).device
        total = torch.zeros((), device=device)
        dices, floor_dices = [], []
        for b in range(images.shape[0]):
            own = context.global_step >= self.own_clicks_after and rng.random() < self.own_clicks_share
            drawn = self.sample(images[b, 0], targets[b, 0], None if valid_np is None else valid_np[b, 0], rng, own)
            if drawn is None:
                continue
            x, y, w = (torch.from_numpy(a).to(device) for a in drawn)
            logits = head(x[None])
            total = total + dice_ce_loss(logits, y[None, None], w[None, None])
            truth = (y > 0.5) & (w > 0)
            dices.append(ev.dice(((logits[0, 0] > 0) & (w > 0)).cpu().numpy(), truth.cpu().numpy()))
            floor_dices.append(ev.dice(((x[2] > 0.5) & (w > 0)).cpu().numpy(), truth.cpu().numpy()))
        if not dices:  # every target empty: a zero loss that still touches the head (DDP needs its gradients)
            total = total + 0.0 * sum(p.sum() for p in head.parameters())
        return total, {"dice": _mean(dices), "floor_dice": _mean(floor_dices)}

    def state_dict(self) -> dict[str, Any]:
        return {"refine_head": True, "own_clicks_after": self.own_clicks_after,
                "own_clicks_share": self.own_clicks_share, "prior": self.prior.to_dict()}

    def changes_on_resume(self, saved_state: Mapping[str, Any]) -> list[str]:
        if not saved_state.get("refine_head"):
            raise UsageError("the run was not trained with --refine-head",
                             "resume it without --refine-head, or start a new run for the refine head")
        return []

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"preset": self.model.config.name, "config": self.model.config.to_dict(),
                "prior": self.prior.to_dict()}

    def check_checkpoint(self, payload: Mapping[str, Any], path: Any) -> None:
        check_preset(payload, self.model.config.name, path)

    def sample_names(self, indices: list[int]) -> list[str]:
        return [self.dataset.describe(i) for i in indices]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
