"""`train`: interactive segmentation training with simulated clicks — the SAM-Med3D / FastSAM3D recipe.

Per training sample (reference/models.md §5.1): encode the 128³ crop once, then `iterations` decoder
steps (11 in the reference). Each step adds ONE new simulated click (the `random` method: a uniform voxel of
the current error region) and feeds back the previous step's low-res logits (zeros before the first click);
at one random step in [2, iterations−2) and at the last step the decoder sees the mask only (no point).
The loss is Dice + cross-entropy on the 128³ upsampled logits, summed over the steps.
`grad_iterations` K selects the fast recipe instead (RITM-style, see `interactive_loss`): a random number of
click rounds without gradients, then K rounds with them, every round with a click.

Optimisation: AdamW (wd 0.1), the prompt encoder and mask decoder at 0.1× the learning rate, a step
schedule (×0.1 at 60% and 90% of the epochs unless `lr_milestones` is given), gradient accumulation,
AMP on CUDA, DDP under torchrun — all in `trainer.Trainer`, which distillation reuses with its own task.

`freeze_encoder` trains only the prompt encoder and decoder (FastSAM3D's decoder fine-tune).
`unfreeze_patience` P (FastSAM3D's train_unfreeze.py): start with the encoder frozen; whenever the epoch
loss has not improved for P epochs, unfreeze one more encoder stage — the last block together with the
neck first, then the earlier blocks from the end backwards, finally the patch embedding — and rebuild
the optimizer and scheduler (the schedule keeps its global epoch count).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fastsam3d_cli.imaging.crops import MODEL_SPACING_MM
from fastsam3d_cli.interactive.prior import (DEFAULT_SCALE, CropPrior, PriorSettings, check_kind, decode_step,
                                            zero_residual)
from fastsam3d_cli.training.clicks import clicks_to_prompt, random_click, ritm_click
from fastsam3d_cli.errors import BadInputError, UsageError
from fastsam3d_cli.training.losses import correction_loss, dice_ce_loss, dice_score
from fastsam3d_cli.training.trainer import (CURVES_PNG, LAST_CHECKPOINT, METRICS_LOG, STEPS_LOG, StepContext, Trainer,
                                   TrainerSettings, TrainingTask, TrainOutcome, check_preset,
                                   load_training_checkpoint, recipe_for_run)

DEFAULT_ITERATIONS = 11
DECODER_LR_SCALE = 0.1
PRIOR_LOSSES = ("dice-ce", "correction")  # a prior model's loss: the reference's, or losses.correction_loss


def check_prior_loss(kind: str) -> str:
    """The --prior-loss value, or UsageError (exit 2) naming the choices."""
    if kind not in PRIOR_LOSSES:
        raise UsageError(f"--prior-loss '{kind}' is unknown", f"use one of: {', '.join(PRIOR_LOSSES)}")
    return kind


# -------------------------------------------------------------------------------- the interaction loop
@dataclass
class InteractionResult:
    loss: torch.Tensor  # summed over decoder steps, scalar
    final_logits: torch.Tensor  # (B, 1, S, S, S) logits after the last step


def mask_only_steps(iterations: int, rng: np.random.Generator) -> set[int]:
    """Steps decoded without a point: one random step in [2, iterations−2) (when that range exists) and the last."""
    steps = {iterations - 1} if iterations >= 2 else set()
    if iterations - 2 > 2:
        steps.add(int(rng.integers(2, iterations - 2)))
    return steps


def interactive_loss(model: nn.Module, embedding: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None,
                     iterations: int, rng: np.random.Generator, grad_iterations: int | None = None,
                     centre_click_share: float = 0.0, prior: "ClassicalPriorBatch | None" = None,
                     prior_loss: str = "dice-ce") -> InteractionResult:
    """Simulate interaction steps on a batch and sum the Dice+CE loss of the steps that carry gradients.

    embedding: (B, 384, 8, 8, 8) from `model.encode`; target: (B, 1, S, S, S) {0, 1}; valid: same shape,
    False = ignore voxel (None = all valid). Clicks are drawn from the current prediction (logits > 0).

    grad_iterations None (the reference recipe): `iterations` steps, two of them mask-only, every step's
    loss summed and back-propagated. grad_iterations K (the RITM-style fast recipe): first a random number
    r ∈ [0, iterations − K] of click rounds run without gradients (their predictions only place the next
    clicks), then K rounds with gradients whose losses are summed; every round adds a click (no mask-only
    rounds, as at inference). A round without gradients costs about a third of one with them.
    centre_click_share: the probability that a click is placed RITM-style (the interior of the larger
    error region, where users click) instead of uniformly in the error (0 = the reference's random clicks).
    prior: train a model that corrects the classical prior (`interactive.prior`): each round's logits are
    P + upsample(gate × M), P from all clicks so far, the mask prompt avgpool(P) + the previous residual; the
    loss is Dice + CE, or `losses.correction_loss` when `prior_loss` is "correction".
    """
    batch = target.shape[0]
    low = model.config.low_res_size
    low_res = torch.zeros((batch, 1, low, low, low), device=embedding.device, dtype=embedding.dtype)
    logits = torch.zeros_like(target)
    truth = target > 0.5
    weight = None if valid is None else valid.to(target.dtype)
    if grad_iterations is None:
        without_point, free_rounds, rounds = mask_only_steps(iterations, rng), 0, iterations
    else:
        free_rounds = int(rng.integers(0, iterations - grad_iterations + 1))
        without_point, rounds = set(), free_rounds + grad_iterations
    total = target.new_zeros(())
    for index in range(rounds):
        if index in without_point:
            points = labels = None
        else:
            prediction = logits.detach() > 0
            clicks = []
            for b in range(batch):
                region_valid = None if valid is None else valid[b, 0]
                place = ritm_click if centre_click_share > 0 and rng.random() < centre_click_share else random_click
                clicks.append(place(prediction[b, 0], truth[b, 0], rng, region_valid))
            points, labels = clicks_to_prompt(clicks, embedding.device)
            if prior is not None:
                prior.add(clicks)
        with torch.set_grad_enabled(torch.is_grad_enabled() and index >= free_rounds):
            if prior is None:
                low_res, _ = model.decode(embedding, points, labels, low_res)
                logits = model.upsample_logits(low_res)
            else:
                prior_logits = prior.logits()
                low_res, logits = decode_step(model, embedding, points, labels, prior_logits, low_res, prior.gate)
            if index >= free_rounds:
                if prior is not None and prior_loss == "correction":
                    total = total + correction_loss(logits, prior_logits, target, weight)
                else:
                    total = total + dice_ce_loss(logits, target, weight)
    return InteractionResult(total, logits)


class ClassicalPriorBatch:
    """The classical prior of each sample of a batch, updated as its clicks arrive (see `interactive.prior`)."""

    def __init__(self, images: torch.Tensor, settings: PriorSettings, gate: torch.Tensor,
                 spacing_mm: float = MODEL_SPACING_MM, refine_head: nn.Module | None = None) -> None:
        volumes = images.detach().float().cpu().numpy()
        self.crops = [CropPrior(volumes[b, 0], spacing_mm) for b in range(volumes.shape[0])]
        self.clicks: list[list[tuple[tuple[int, int, int], bool]]] = [[] for _ in self.crops]
        self.settings, self.gate, self.device = settings, gate, images.device
        self.refine_head = refine_head  # a model's refine head corrects each map (interactive/refine.py)
        self._maps: list[tuple[int, np.ndarray] | None] = [None for _ in self.crops]  # (clicks used, logits)

    def add(self, clicks: Sequence[Any]) -> None:
        """One simulated click per sample (None: that sample got none this round)."""
        for b, click in enumerate(clicks):
            if click is not None:
                self.clicks[b].append((tuple(int(v) for v in click.position), click.label == 1))

    def logits(self) -> torch.Tensor:
        """(B, 1, S, S, S) prior logits from each sample's clicks so far (a sample without a new click since the
        last call, e.g. in a mask-only round, keeps its map: the floor is not run twice for the same clicks)."""
        for b, (crop, clicks) in enumerate(zip(self.crops, self.clicks)):
            cached = self._maps[b]
            if cached is None or cached[0] != len(clicks):
                self._maps[b] = (len(clicks), crop.logits(clicks, self.settings.scale, self.refine_head))
        return torch.from_numpy(np.stack([m[1] for m in self._maps])[:, None]).to(self.device)


# ---------------------------------------------------------------------------------------- the task
class InteractiveSegmentationTask(TrainingTask):
    """Trains a Sam3D to segment from clicks: the `TrainingTask` of `fastsam3d train`."""

    name = "train"
    best_metric = "dice"
    best_mode = "max"

    def __init__(self, model: nn.Module, dataset: Any, iterations: int = DEFAULT_ITERATIONS,
                 freeze_encoder: bool = False, unfreeze_patience: int | None = None,
                 decoder_lr_scale: float = DECODER_LR_SCALE, grad_iterations: int | None = None,
                 centre_click_share: float = 0.0, prior: PriorSettings | None = None,
                 prior_loss: str = "dice-ce") -> None:
        self.model, self.dataset = model, dataset
        self.prior, self.prior_loss = prior, check_prior_loss(prior_loss)
        # The prior's residual weight trains with the decoder; it lives beside the model, not in its state dict.
        self.gate = None if prior is None else nn.Parameter(torch.tensor(float(prior.gate)))
        self.iterations = int(iterations)
        self.grad_iterations = None if grad_iterations is None else int(grad_iterations)
        self.centre_click_share = float(centre_click_share)
        self.decoder_lr_scale = float(decoder_lr_scale)
        self.unfreeze_patience = unfreeze_patience
        self.freeze_encoder = bool(freeze_encoder or unfreeze_patience is not None)
        self.unfrozen_stages = 0
        self.best_epoch_loss: float | None = None
        self.epochs_without_improvement = 0
        self._apply_freezing()

    # ---- which parameters train
    def encoder_stages(self) -> list[list[nn.Parameter]]:
        """Encoder parameter groups in unfreezing order: neck + last block, earlier blocks backwards, patch embedding."""
        encoder = self.model.image_encoder
        blocks = list(encoder.blocks)
        stages = [list(encoder.neck.parameters()) + list(blocks[-1].parameters())]
        stages += [list(block.parameters()) for block in reversed(blocks[:-1])]
        stages.append(list(encoder.patch_embed.parameters()) + [encoder.pos_embed])
        return stages

    def _apply_freezing(self) -> None:
        for parameter in self.model.parameters():
            parameter.requires_grad_(True)
        if self.freeze_encoder:
            for parameter in self.model.image_encoder.parameters():
                parameter.requires_grad_(False)
            for stage in self.encoder_stages()[:self.unfrozen_stages]:
                for parameter in stage:
                    parameter.requires_grad_(True)

    @property
    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.image_encoder.parameters())

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        encoder = [p for p in self.model.image_encoder.parameters() if p.requires_grad]
        prompt_and_decoder = [p for module in (self.model.prompt_encoder, self.model.mask_decoder)
                              for p in module.parameters() if p.requires_grad]
        if self.gate is not None:
            prompt_and_decoder.append(self.gate)
        groups = []
        if encoder:
            groups.append({"params": encoder, "lr": lr, "name": "image_encoder"})
        groups.append({"params": prompt_and_decoder, "lr": lr * self.decoder_lr_scale, "name": "prompt_encoder+mask_decoder"})
        return groups

    # ---- one micro-batch
    def step(self, batch: Mapping[str, Any], context: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        image, target = batch["image"], batch["label"]
        valid = batch.get("valid")
        if valid is not None and bool(valid.all()):
            valid = None
        with torch.set_grad_enabled(self.encoder_trainable):
            embedding = self.model.encode(image)
        prior = None
        if self.prior is not None and self.gate is not None:
            prior = ClassicalPriorBatch(image, self.prior, self.gate.to(image.device),
                                        refine_head=getattr(self.model, "refine_head", None))
        result = interactive_loss(self.model, embedding, target, valid, self.iterations, context.rng(),
                                  self.grad_iterations, self.centre_click_share, prior, self.prior_loss)
        prediction = result.final_logits.detach() > 0
        dices = [dice_score(prediction[b], target[b] > 0.5, None if valid is None else valid[b])
                 for b in range(target.shape[0])]
        return result.loss, {"dice": float(np.nanmean(dices)) if not all(math.isnan(d) for d in dices) else math.nan}

    # ---- progressive unfreezing
    def end_of_epoch(self, record: dict[str, Any], log: Callable[[str], None]) -> bool:
        if self.unfreeze_patience is None:
            return False
        loss = float(record["loss"])
        if self.best_epoch_loss is None or loss < self.best_epoch_loss:
            self.best_epoch_loss, self.epochs_without_improvement = loss, 0
            return False
        self.epochs_without_improvement += 1
        if self.epochs_without_improvement < self.unfreeze_patience or self.unfrozen_stages >= len(self.encoder_stages()):
            return False
        self.unfrozen_stages += 1
        self.epochs_without_improvement = 0
        self._apply_freezing()
        log(f"loss has not improved for {self.unfreeze_patience} epoch(s): unfroze encoder stage "
            f"{self.unfrozen_stages}/{len(self.encoder_stages())}")
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "grad_iterations": self.grad_iterations,
                "centre_click_share": self.centre_click_share, "freeze_encoder": self.freeze_encoder,
                "unfreeze_patience": self.unfreeze_patience, "unfrozen_stages": self.unfrozen_stages,
                "best_epoch_loss": self.best_epoch_loss, "epochs_without_improvement": self.epochs_without_improvement,
                "prior": self.prior_settings(), "prior_loss": self.prior_loss}

    def prior_settings(self) -> dict[str, Any] | None:
        """The checkpoint's "prior" entry: the settings with the gate as trained so far (None: no prior)."""
        if self.prior is None or self.gate is None:
            return None
        return PriorSettings(self.prior.kind, self.prior.scale, float(self.gate.detach())).to_dict()

    def changes_on_resume(self, saved_state: Mapping[str, Any]) -> list[str]:
        if saved_state.get("refine_head"):
            raise UsageError("the run was trained with --refine-head", "resume it with --refine-head")
        flags = {"iterations": "--iterations", "grad_iterations": "--grad-iterations",
                 "centre_click_share": "--centre-clicks", "freeze_encoder": "--freeze-encoder",
                 "unfreeze_patience": "--unfreeze-patience", "prior_loss": "--prior-loss"}
        saved_prior, prior = (saved_state.get("prior") or {}).get("kind", "none"), self.prior.kind if self.prior else "none"
        if saved_prior != prior:
            raise UsageError(f"the run was trained with --prior {saved_prior}, not {prior}",
                             f"resume with --prior {saved_prior}, or start a new run with --init")
        now = self.state_dict()
        return [f"resumed with {flag} {now[name]} (the run was started with {saved_state[name]})"
                for name, flag in flags.items() if name in saved_state and saved_state[name] != now[name]]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.unfrozen_stages = int(state.get("unfrozen_stages", 0))
        self.best_epoch_loss = state.get("best_epoch_loss")
        self.epochs_without_improvement = int(state.get("epochs_without_improvement", 0))
        saved_prior = state.get("prior")
        if self.gate is not None and self.prior is not None and isinstance(saved_prior, Mapping):
            saved = PriorSettings.from_dict(saved_prior)  # a resumed run keeps its own scale and gate
            assert saved is not None
            self.prior = saved
            with torch.no_grad():
                self.gate.fill_(float(saved.gate))
        self._apply_freezing()

    # ---- checkpoints
    def checkpoint_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"preset": self.model.config.name, "config": self.model.config.to_dict()}
        if self.prior is not None:
            extra["prior"] = self.prior_settings()
        return extra

    def check_checkpoint(self, payload: Mapping[str, Any], path: Path) -> None:
        check_preset(payload, self.model.config.name, path)

    def sample_names(self, indices: list[int]) -> list[str]:
        return [self.dataset.describe(i) for i in indices]


# ------------------------------------------------------------------------------------------ the API
@dataclass
class TrainResult:
    """Summary of a `train` call (on this rank); `model` is the trained Sam3D (in train mode, on its device)."""

    run_dir: Path
    preset: str
    device: str
    world_size: int
    rank: int
    samples: int
    excluded_samples: int
    outcome: TrainOutcome
    model: nn.Module | None = None
    warnings: list[str] = field(default_factory=list)
    empty_samples: int = 0  # of `excluded_samples`: left out because the label is empty

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_json(self) -> dict[str, Any]:
        o = self.outcome
        last_epoch = o.epoch_records[-1] if o.epoch_records else None
        return {"run_dir": str(self.run_dir), "model": self.preset, "device": self.device,
                "processes": self.world_size, "samples": self.samples, "excluded_samples": self.excluded_samples,
                "empty_samples": self.empty_samples,
                "epochs_completed": o.epochs_completed, "global_step": o.global_step, "stop_reason": o.stop_reason,
                "resumed_from_step": o.resumed_from_step,
                "last_epoch": last_epoch, "best": {"metric": o.best_metric, "value": o.best_value},
                "checkpoints": {"last": str(o.last_checkpoint) if o.last_checkpoint else None,
                                "best": str(o.best_checkpoint) if o.best_checkpoint else None},
                "metrics": str(self.run_dir / METRICS_LOG), "steps": str(self.run_dir / STEPS_LOG),
                "plot": str(self.run_dir / CURVES_PNG), "wall_s": round(o.wall_s, 2), "warnings": self.warnings}


def default_run_dir(preset: str) -> Path:
    """runs/<model>-<YYYYmmdd-HHMMSS> under the current folder."""
    return Path("runs") / f"{preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def make_run_dir(run_dir: Path) -> None:
    """Create the run folder (and missing parents); a failure the checks could not foresee (a read-only or
    virtual file system, a race) is a BadInputError naming the folder, not an internal error."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"run folder {run_dir} cannot be created: {exc.strerror or exc}",
                            "choose another location with --output") from None


def check_run_dir(run_dir: Path, resume: bool) -> Path:
    """Validate the run folder before anything is written (exit 3 for every problem)."""
    run_dir = Path(run_dir).expanduser().absolute()
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInputError(f"run folder {run_dir} is a file", "choose a folder with --output")
    last = run_dir / LAST_CHECKPOINT
    if resume and not last.is_file():
        raise BadInputError(f"--resume but {run_dir} holds no {LAST_CHECKPOINT}",
                            "give the --output folder of an earlier run, or drop --resume to start a new one")
    if not resume and last.exists():
        raise BadInputError(f"{run_dir} already holds a training run ({LAST_CHECKPOINT})",
                            "pass --resume to continue it, or choose another --output")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BadInputError(f"run folder {run_dir} cannot be created: {existing} is a file",
                            "choose another location with --output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInputError(f"run folder {run_dir} is not writable", "choose a writable location with --output")
    return run_dir


_OPTION_NAMES = {"min_foreground_voxels": "--min-foreground", "time_limit_s": "--time-limit",
                 "save_every_steps": "--save-every"}


def check_numbers(**values: Any) -> None:
    """UsageError (exit 2) for out-of-range numbers, named as the command-line option."""
    minimums = {"epochs": 1, "batch_size": 1, "accumulate": 1, "iterations": 1, "workers": 0, "max_steps": 0,
                "unfreeze_patience": 1, "min_foreground_voxels": 1, "max_shift": 0, "save_every_steps": 1}
    for name, value in values.items():
        if value is None:
            continue
        option = _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
        if name in ("lr", "time_limit_s") and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{option} must be positive (got {value:g})", "give a positive number")
        if name == "weight_decay" and not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"{option} must be zero or positive (got {value:g})", "give e.g. 0.1 or 1e-4")
        if name in minimums and value < minimums[name]:
            raise UsageError(f"{option} must be at least {minimums[name]} (got {value})",
                             f"give a value >= {minimums[name]}")


def check_refine_head_options(config_name: str, refine_head: bool, prior: str, prior_loss: str, freeze_encoder: bool,
                              unfreeze_patience: int | None, grad_iterations: int | None,
                              centre_click_share: float) -> None:
    """UsageError (exit 2) for a refine-head request that cannot mean what it says (checked before any work)."""
    from fastsam3d_cli.model import get_config

    has_head = bool(get_config(config_name).refine_head_widths)
    if not refine_head:
        if has_head and prior != "classical":
            raise UsageError(f"model '{config_name}' corrects the classical prior with its refine head",
                             "add --prior classical")
        return
    if prior != "classical":
        raise UsageError("--refine-head trains the correction of the classical prior", "add --prior classical")
    if not has_head:
        raise UsageError(f"model '{config_name}' has no refine head", "use --model fastsam3d-tiny-refine")
    decoder_only = {"--freeze-encoder": freeze_encoder, "--unfreeze-patience": unfreeze_patience is not None,
                    "--grad-iterations": grad_iterations is not None, "--centre-clicks": centre_click_share > 0,
                    "--prior-loss": prior_loss != "dice-ce"}
    given = [flag for flag, used in decoder_only.items() if used]
    if given:
        raise UsageError(f"{', '.join(given)} set(s) how the SAM decoder trains; --refine-head trains the head alone",
                         f"drop {', '.join(given)}, or train the decoder in a run without --refine-head")


def default_milestones(epochs: int) -> tuple[int, ...]:
    """×0.1 at 60% and 90% of the epochs (SAM-Med3D: 120/180 of 200; FastSAM3D: 60/90 of 100)."""
    return tuple(sorted({max(1, round(epochs * 0.6)), max(1, round(epochs * 0.9))}))


def train(prepared_dirs: Sequence[str | Path], model: str, *, init: str | Path | None = None,
          freeze_encoder: bool = False, epochs: int = 100, batch_size: int = 1, accumulate: int = 1,
          lr: float | None = None, output: str | Path | None = None, resume: bool = False, device: str = "auto",
          amp: bool = False, workers: int = 0, seed: int | None = None, iterations: int = DEFAULT_ITERATIONS,
          unfreeze_patience: int | None = None, lr_milestones: Sequence[int] | None = None,
          lr_gamma: float | None = None, weight_decay: float | None = None, max_steps: int | None = None,
          time_limit_s: float | None = None,
          save_every_steps: int | None = None, classes: Sequence[str] | None = None,
          min_foreground_voxels: int = 1000, max_shift: int = 16, attention: str = "auto",
          grad_iterations: int | None = None, centre_click_share: float = 0.0,
          decoder_lr_scale: float = DECODER_LR_SCALE,
          data_mix: str | Mapping[str, float] | None = None, label_maps: Sequence[str | Path] | None = None,
          samples_per_epoch: int | None = None, prior: str = "none", prior_scale: float = DEFAULT_SCALE,
          prior_loss: str = "dice-ce", refine_head: bool = False, log: Callable[[str], None] | None = None,
          on_step: Callable[[dict[str, Any], int], None] | None = None) -> TrainResult:
    """Train (or fine-tune, or resume) a model on prepared folders; see the module docstring for the recipe.

    `lr`, `weight_decay`, `lr_milestones`, `lr_gamma` and `seed` left None take the recipe's defaults (8e-4,
    0.1, 60%/90% of `epochs`, 0.1, 2023); a resumed run keeps its own and warns about any given that differ.

    Every input is checked before anything is written: bad numbers → UsageError (2); empty or wrong-layout
    data, an unwritable run folder, `resume` without `last.pth`, a new run into an existing one →
    BadInputError (3); an `init`/resume checkpoint of another model → WeightsError (4). Under torchrun
    each process calls this; rank 0 writes the run folder.

    `prior` "classical" trains a model that corrects the classical floor's region (interactive/prior.py), with
    the loss `prior_loss` ("dice-ce", or "correction": `losses.correction_loss`).

    `refine_head` trains only the refine head of a prior model that has one (`fastsam3d-tiny-refine`) on the
    floor's errors at full resolution (training/refine_train.py); the SAM part is saved as it is.

    `data_mix` ("real=0.3,shapes=0.7" or a mapping) draws each epoch's `samples_per_epoch` items from generated
    sources too (data/mixing.py); `label_maps` are the nnU-Net folders the synth-labels and supervoxels sources use.
    """
    from fastsam3d_cli.training import distributed
    from fastsam3d_cli.device import resolve_device
    from fastsam3d_cli.model import build_model, get_config
    from fastsam3d_cli.data.prepared import list_prepared_samples
    from fastsam3d_cli.data.training_data import InteractiveCropDataset, empty_label_warnings, run_warnings
    from fastsam3d_cli.data.mixing import build_training_dataset, check_mix_options, describe_mix

    check_numbers(epochs=epochs, batch_size=batch_size, accumulate=accumulate, iterations=iterations,
                   workers=workers, max_steps=max_steps, unfreeze_patience=unfreeze_patience, lr=lr,
                   time_limit_s=time_limit_s, min_foreground_voxels=min_foreground_voxels, max_shift=max_shift,
                   save_every_steps=save_every_steps, weight_decay=weight_decay)
    mix = check_mix_options(data_mix, label_maps, samples_per_epoch)
    if grad_iterations is not None and not 1 <= grad_iterations <= iterations:
        raise UsageError(f"--grad-iterations {grad_iterations} is outside 1..--iterations ({iterations})",
                         "give a value between 1 and --iterations")
    if not 0.0 <= centre_click_share <= 1.0 or math.isnan(centre_click_share):
        raise UsageError(f"--centre-clicks {centre_click_share} is not a share", "give a value between 0 and 1")
    if not decoder_lr_scale > 0 or math.isinf(decoder_lr_scale):
        raise UsageError(f"--decoder-lr-scale {decoder_lr_scale} must be positive", "give a value > 0, e.g. 0.1")
    check_kind(prior)
    check_prior_loss(prior_loss)
    if prior_loss != "dice-ce" and prior == "none":
        raise UsageError(f"--prior-loss {prior_loss} without a prior", "add --prior classical, or drop --prior-loss")
    if not (math.isfinite(prior_scale) and prior_scale > 0):
        raise UsageError(f"--prior-scale {prior_scale} must be positive", "give the prior's logit, e.g. 4")
    check_refine_head_options(config_name=model, refine_head=refine_head, prior=prior, prior_loss=prior_loss,
                              freeze_encoder=freeze_encoder, unfreeze_patience=unfreeze_patience,
                              grad_iterations=grad_iterations, centre_click_share=centre_click_share)
    if init is not None and resume:
        raise UsageError("--init and --resume together", "--resume continues the run's own weights; drop --init")
    from fastsam3d_cli.device import check_attention_name

    check_attention_name(attention)  # a usage error, before the data and run-folder checks
    config = get_config(model)
    env = distributed.detect_environment()
    torch_device = distributed.device_for_rank(env, resolve_device(device))
    if not prepared_dirs:
        raise UsageError("no PREPARED_DIR given", "give at least one folder written by fastsam3d prepare")
    samples = [s for folder in prepared_dirs for s in list_prepared_samples(Path(folder), classes=classes)]
    run_dir = check_run_dir(Path(output) if output is not None else default_run_dir(config.name), resume)
    resume_payload = None
    if resume:
        resume_payload = load_training_checkpoint(run_dir / LAST_CHECKPOINT, InteractiveSegmentationTask.name)
        check_preset(resume_payload, config.name, run_dir / LAST_CHECKPOINT)
    recipe, recipe_warnings = recipe_for_run(resume_payload, lr=lr, weight_decay=weight_decay, lr_gamma=lr_gamma,
                                             seed=seed, lr_milestones=lr_milestones,
                                             default_milestones=default_milestones(epochs))
    seed = int(recipe["seed"])
    warnings = recipe_warnings + run_warnings(samples, amp, torch_device)

    # Empty labels are found (and left out) here; no usable sample left → exit 3 before the run folder exists.
    dataset = InteractiveCropDataset(samples, seed=seed, max_shift=max_shift,
                                     min_foreground_voxels=min_foreground_voxels, crop_size=config.image_size)
    warnings.extend(empty_label_warnings(dataset.empty))
    too_small = len(dataset.excluded) - len(dataset.empty)
    if too_small:
        warnings.append(f"{too_small} of {len(samples)} sample(s) have fewer than {min_foreground_voxels} "
                        "label voxels and are left out")
    dataset = build_training_dataset(dataset, mix, seed, min_foreground_voxels, crop_size=config.image_size)

    torch.manual_seed(seed)  # the same initial weights on every rank and every rerun
    if init is not None:
        from fastsam3d_cli.model.checkpoint import load_model

        network, _ = load_model(init, preset=config.name, device=torch_device, attention=attention)
    else:
        network = build_model(config.name, attention=attention, device=torch_device)
    network.train()
    # --init from a prior checkpoint continues its residual, scale and gate; any other new prior run starts
    # as the floor exactly (the residual zeroed, interactive/prior.py)
    init_prior = PriorSettings.from_dict(getattr(network, "prior_settings", None), str(init)) if init else None
    prior_settings = None
    if prior == "classical":
        prior_settings = init_prior if init_prior is not None else PriorSettings(scale=prior_scale)
        if init_prior is None and not resume:
            zero_residual(network)
    task: TrainingTask
    if refine_head:
        from fastsam3d_cli.training.refine_train import RefineHeadTask

        assert prior_settings is not None
        task = RefineHeadTask(network, dataset, prior_settings)
    else:
        task = InteractiveSegmentationTask(network, dataset, iterations=iterations, freeze_encoder=freeze_encoder,
                                           unfreeze_patience=unfreeze_patience, decoder_lr_scale=decoder_lr_scale,
                                           grad_iterations=grad_iterations, centre_click_share=centre_click_share,
                                           prior=prior_settings, prior_loss=prior_loss)
    settings = TrainerSettings(run_dir=run_dir, epochs=epochs, batch_size=batch_size, accumulate=accumulate,
                               lr=float(recipe["lr"]), weight_decay=float(recipe["weight_decay"]),
                               lr_milestones=tuple(int(m) for m in recipe["lr_milestones"]),
                               lr_gamma=float(recipe["lr_gamma"]), amp=amp, workers=workers, seed=seed,
                               max_steps=max_steps, time_limit_s=time_limit_s, save_every_steps=save_every_steps)
    created = distributed.init_process_group(env, torch_device)
    try:
        if env.is_main:
            make_run_dir(run_dir)
        distributed.barrier(env)
        emit = distributed.rank_aware(log, env)
        for warning in warnings:
            emit(f"warning: {warning}")
        if mix.ratios is not None:
            emit(f"data mix per epoch: {describe_mix(dataset)}")
        emit(f"training {config.name} on {len(dataset)} sample(s), {torch_device}, {env.world_size} process(es) → {run_dir}")
        trainer = Trainer(task, settings, torch_device, env, log=emit, on_step=on_step)
        outcome = trainer.run(resume_payload)
        distributed.barrier(env)
    finally:
        distributed.cleanup(created)
    return TrainResult(run_dir, config.name, str(torch_device), env.world_size, env.rank, len(dataset),
                       len(dataset.excluded), outcome, network, warnings + outcome.warnings,
                       empty_samples=len(dataset.empty))
