"""The training-loop machinery shared by `train` and `distill`: what is trained and the per-step loss come from
a `TrainingTask`; everything else lives here.

    task = InteractiveSegmentationTask(...)          # or a distillation task: model, dataset, param groups, step()
    outcome = Trainer(task, settings, device).run(resume=True)

The Trainer owns: AdamW over the task's parameter groups with a step (MultiStepLR) schedule per epoch,
gradient accumulation, AMP on CUDA (autocast float16 + GradScaler), DDP under torchrun (each rank its
share of every epoch, gradients averaged), checkpoints written atomically in the official layout
(`model_state_dict` + optimizer, scheduler, epoch, RNG states, config) as `last.pth` each epoch and
`best.pth` when the epoch metric improves, `metrics.jsonl` (one line per epoch), `steps.jsonl` (one
per optimizer step), `train.png`, and a graceful stop on Ctrl-C, `max_steps` or a time limit (a
checkpoint at the last finished step, from which `--resume` continues).

Exact resume: every random choice of a step (augmentation, clicks) is derived from (seed, epoch, index)
or (seed, step, micro-batch, rank), never from hidden generator state, and the checkpoint holds the
sample position inside the epoch. So N steps in one go and N/2 + resume + N/2 give the same weights.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import math
import random
import signal
import threading
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from fastsam3d_cli import __version__
from fastsam3d_cli.imaging.atomic import write_text_atomic
from fastsam3d_cli.training.distributed import SINGLE_PROCESS, DistributedEnv, all_reduce_sum
from fastsam3d_cli.errors import UsageError, WeightsError

LAST_CHECKPOINT, BEST_CHECKPOINT = "last.pth", "best.pth"
METRICS_LOG, STEPS_LOG, CURVES_PNG = "metrics.jsonl", "steps.jsonl", "train.png"
CHECKPOINT_FORMAT = "fastsam3d-training"


# ------------------------------------------------------------------------------------------- settings
@dataclass
class TrainerSettings:
    """Optimisation settings (the task decides the model, data and loss)."""

    run_dir: Path
    epochs: int = 100
    batch_size: int = 1
    accumulate: int = 1
    lr: float = 8e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    lr_milestones: tuple[int, ...] = ()  # epochs after which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    amp: bool = False  # autocast float16 + GradScaler; CUDA only
    workers: int = 0  # DataLoader worker processes
    seed: int = 2023
    max_steps: int | None = None  # stop after this many optimizer steps in total (across resumes)
    time_limit_s: float | None = None  # stop this invocation after this long (at a step boundary)
    save_every_steps: int | None = None  # also write last.pth every N steps (besides each epoch)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        data["betas"] = list(self.betas)
        data["lr_milestones"] = list(self.lr_milestones)
        return data


# ------------------------------------------------------------------------------------------- resume
# What a resumed run takes from its checkpoint, not from the command: the optimizer and the lr schedule are
# restored from last.pth (they carry the lr, weight decay, milestones and gamma), and the seed fixes the
# sample order that the saved position inside an epoch refers to. A new run's defaults (milestones: the task's).
RECIPE_DEFAULTS = {"lr": 8e-4, "weight_decay": 0.1, "lr_gamma": 0.1, "seed": 2023}
_FLAGS = {"lr": "--lr", "lr_milestones": "--lr-milestones", "seed": "--seed", "epochs": "--epochs"}


def recipe_for_run(resume_payload: Mapping[str, Any] | None, *, lr: float | None, weight_decay: float | None,
                   lr_gamma: float | None, seed: int | None, lr_milestones: Sequence[int] | None,
                   default_milestones: Sequence[int]) -> tuple[dict[str, Any], list[str]]:
    """The run's lr, weight decay, lr gamma, seed and milestones, and a warning for each the command cannot change.

    Arguments left None were not given. A new run (`resume_payload` None) takes the given values, else
    `RECIPE_DEFAULTS` / `default_milestones`. A resumed run keeps the values in its checkpoint's `args`, so logs
    and the next checkpoint say what really runs; each value given that differs is reported as ignored instead
    of dropped silently.
    """
    requested = {"lr": lr, "weight_decay": weight_decay, "lr_gamma": lr_gamma, "seed": seed,
                 "lr_milestones": None if lr_milestones is None else tuple(sorted(int(m) for m in lr_milestones))}
    defaults = {**RECIPE_DEFAULTS, "lr_milestones": tuple(default_milestones)}
    saved_args = (resume_payload.get("args") or {}) if resume_payload is not None else {}
    resolved: dict[str, Any] = {}
    warnings: list[str] = []
    for name, value in requested.items():
        if saved_args.get(name) is None:
            resolved[name] = defaults[name] if value is None else value
            continue
        saved = saved_args[name]
        resolved[name] = tuple(saved) if isinstance(saved, list) else saved
        if value is not None and not _same_setting(value, saved):
            warnings.append(f"{_FLAGS.get(name, name)} {_show(value)} is ignored on resume: the run keeps its "
                            f"{_show(saved)} (restored from last.pth); start a new run to change it")
    return resolved, warnings


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return [float(x) for x in a] == [float(x) for x in b]
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def data_identity(task: "TrainingTask") -> dict[str, Any]:
    """How many samples a run trains on, and a digest of their names (kept in each checkpoint)."""
    import hashlib

    names = sorted(task.sample_names(list(range(len(task.dataset)))))  # type: ignore[arg-type]
    return {"samples": len(names), "digest": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]}


@dataclass
class StepContext:
    """Where a micro-batch sits; `rng()` is its own generator, a pure function of these numbers."""

    epoch: int  # 0-based epoch
    global_step: int  # optimizer steps finished before this one
    micro_index: int  # micro-batch within the accumulation group
    rank: int
    seed: int
    device: torch.device

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, 7, self.global_step, self.micro_index, self.rank])


def check_preset(payload: Mapping[str, Any], preset: str, path: Path) -> None:
    """WeightsError (exit 4) when a training checkpoint belongs to another model preset."""
    if payload.get("preset") != preset:
        raise WeightsError(f"{path} is a checkpoint of model '{payload.get('preset')}', not '{preset}'",
                           f"resume with --model {payload.get('preset')}, or start a new run")


# ----------------------------------------------------------------------------------------------- task
class TrainingTask(ABC):
    """What a recipe supplies: the model being trained, its data, its parameter groups and its per-step loss.

    `model` is the Sam3D whose `state_dict()` goes into `model_state_dict`. `step` runs inside DDP's
    forward, so everything that needs gradients must happen there.
    """

    name: str = "task"
    best_metric: str = "loss"  # an epoch-record key
    best_mode: str = "min"  # "min" or "max"
    model: nn.Module
    dataset: Dataset

    @abstractmethod
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """AdamW parameter groups of the currently trainable parameters (each with its own "lr")."""

    @abstractmethod
    def step(self, batch: Mapping[str, Any], context: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss (scalar, differentiable, not yet divided for accumulation) and metrics (floats) of one micro-batch."""

    def end_of_epoch(self, record: dict[str, Any], log: Callable[[str], None]) -> bool:
        """Called after each epoch with its record; return True when the trainable parameters changed.

        The record is the epoch's `metrics.jsonl` line: keys added here (e.g. a distillation stage's MSE)
        are written with it, and may serve as `best_metric`.
        """
        return False

    def state_dict(self) -> dict[str, Any]:
        """Task state to checkpoint (plain types): e.g. which encoder blocks are unfrozen."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` (called before the optimizer is rebuilt on resume)."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """Extra top-level checkpoint entries (plain types): e.g. the model config and preset."""
        return {}

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """What goes into `model_state_dict` (a distillation task may save only the encoder)."""
        return self.model.state_dict()

    def load_model_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of `model_state_dict` on resume (strict)."""
        self.model.load_state_dict(state, strict=True)

    def check_checkpoint(self, payload: Mapping[str, Any], path: Path) -> None:
        """Raise WeightsError when a checkpoint to resume from belongs to another model or task."""

    def sample_names(self, indices: list[int]) -> list[str]:
        return [str(i) for i in indices]

    def changes_on_resume(self, saved_state: Mapping[str, Any]) -> list[str]:
        """Warnings for task settings this command changes compared with the checkpoint's `state_dict()`."""
        return []

    def plot(self, step_records: list[dict[str, Any]], epoch_records: list[dict[str, Any]], path: Path,
             title: str) -> None:
        """Draw the run's curves into `path` (PNG). Default: loss and Dice per step and per epoch."""
        from fastsam3d_cli.training.plots import plot_training_curves

        plot_training_curves(step_records, epoch_records, path, title=title)


class _TaskModule(nn.Module):
    """Wraps the task so that DDP's forward runs the whole step (gradient hooks see every parameter used)."""

    def __init__(self, task: TrainingTask) -> None:
        super().__init__()
        self.model = task.model
        self.task = [task]  # a list so nn.Module does not try to register it

    def forward(self, batch: Mapping[str, Any], context: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        return self.task[0].step(batch, context)


# -------------------------------------------------------------------------------------------- sampler
class EpochSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch permutation, padded so every rank gets the same count.

    Like DistributedSampler, plus `skip`: start inside the epoch (exact resume).
    """

    def __init__(self, length: int, env: DistributedEnv, seed: int, shuffle: bool = True) -> None:
        self.length, self.env, self.seed, self.shuffle = length, env, seed, shuffle
        self.epoch, self.skip = 0, 0

    @property
    def per_rank(self) -> int:
        return math.ceil(self.length / self.env.world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def rank_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.env.world_size
        order = (order * math.ceil(total / self.length))[:total]
        return order[self.env.rank::self.env.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.skip:])

    def __len__(self) -> int:
        return self.per_rank - self.skip


# -------------------------------------------------------------------------------------------- outcome
@dataclass
class TrainOutcome:
    """What a run did (on this rank)."""

    run_dir: Path
    epochs_completed: int
    global_step: int
    stop_reason: str  # completed | max_steps | time_limit | interrupted
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_metric: str
    best_value: float | None
    epoch_records: list[dict[str, Any]]
    step_records: list[dict[str, Any]]
    samples_seen: list[int]  # dataset indices this rank trained on in this invocation
    wall_s: float
    resumed_from_step: int | None = None
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Torch, CUDA, numpy and python RNG states as tensors/lists (loadable with weights_only=True)."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": [int(version), list(python_state), gauss_next]}


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))


# ------------------------------------------------------------------------------------- graceful stop
class _GracefulStop:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.requested = False
        self._log = log
        self._previous: Any = None

    def __enter__(self) -> "_GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log("interrupt: finishing this step and writing last.pth (press Ctrl-C again to abort at once)")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# -------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Runs a TrainingTask: epochs of accumulated optimizer steps, logs, checkpoints, DDP, resume."""

    def __init__(self, task: TrainingTask, settings: TrainerSettings, device: torch.device,
                 env: DistributedEnv = SINGLE_PROCESS, log: Callable[[str], None] | None = None,
                 on_step: Callable[[dict[str, Any], int], None] | None = None) -> None:
        self.task, self.settings, self.device, self.env = task, settings, device, env
        self.log = log or (lambda message: None)
        self.on_step = on_step
        self.run_dir = Path(settings.run_dir)
        self.use_amp = bool(settings.amp and device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.sampler = EpochSampler(len(task.dataset), env, settings.seed)
        self._data_identity = data_identity(task)
        self.micro_per_epoch = math.ceil(self.sampler.per_rank / settings.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / settings.accumulate)
        # Progress counters (all restored on resume).
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.step_in_epoch = 0
        self.epoch_sums: dict[str, float] = {}
        self.best_value: float | None = None
        self.epoch_records: list[dict[str, Any]] = []
        self.step_records: list[dict[str, Any]] = []
        self.samples_seen: list[int] = []
        self.warnings: list[str] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.wrapped: nn.Module | None = None

    # ------------------------------------------------------------------ optimiser, scheduler, DDP
    def _build_optimization(self) -> None:
        """AdamW over the task's current groups; MultiStepLR positioned at the current epoch."""
        groups = self.task.param_groups(self.settings.lr)
        if not any(p.requires_grad for group in groups for p in group["params"]):
            raise UsageError("nothing to train: every parameter is frozen", "drop --freeze-encoder or choose another task")
        self.optimizer = torch.optim.AdamW(groups, lr=self.settings.lr, betas=self.settings.betas,
                                           weight_decay=self.settings.weight_decay)
        factor = self.settings.lr_gamma ** bisect.bisect_right(sorted(self.settings.lr_milestones), self.epoch)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group["lr"]
            group["lr"] = group["lr"] * factor
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(self.settings.lr_milestones), gamma=self.settings.lr_gamma,
            last_epoch=self.epoch - 1)
        # The constructor's own first step leaves lr as set above except on a milestone epoch; reset it.
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self._wrap()

    def _wrap(self) -> None:
        module = _TaskModule(self.task)
        if self.env.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: the IoU head (and, per step, the point or mask prompt path) gets no gradient.
            module = DistributedDataParallel(module, device_ids=None, find_unused_parameters=True)
        self.wrapped = module

    # ------------------------------------------------------------------ checkpoints
    def _payload(self) -> dict[str, Any]:
        assert self.optimizer is not None and self.scheduler is not None
        epoch_losses = [r.get("loss") for r in self.epoch_records]
        epoch_dices = [r.get("dice") for r in self.epoch_records]  # the official checkpoints' names
        return {
            "format": CHECKPOINT_FORMAT,
            "fastsam3d_version": __version__,
            "task": self.task.name,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "step_in_epoch": self.step_in_epoch,
            "epoch_sums": dict(self.epoch_sums),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "lr_scheduler_state_dict": self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "losses": epoch_losses,
            "dices": epoch_dices,
            "best": {"metric": self.task.best_metric, "mode": self.task.best_mode, "value": self.best_value},
            "args": self.settings.to_dict(),
            "data": self._data_identity,
            "world_size": self.env.world_size,
            "rng_state": capture_rng_state(),
            "task_state": self.task.state_dict(),
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **self.task.checkpoint_extra(),
        }

    def save(self, best: bool = False) -> Path:
        """Write last.pth (and best.pth) atomically — rank 0 only; other ranks return the path."""
        from fastsam3d_cli.model.checkpoint import save_checkpoint

        path = self.run_dir / LAST_CHECKPOINT
        if self.env.is_main:
            payload = self._payload()
            state = self.task.model_state_dict()
            save_checkpoint(path, state, **payload)
            if best:
                save_checkpoint(self.run_dir / BEST_CHECKPOINT, state, **payload)
        self._saved_at_step = self.global_step
        return path

    def _restore(self, payload: Mapping[str, Any], path: Path) -> None:
        """Resume from a loaded last.pth: task state, weights, optimizer, scheduler, scaler, counters, RNG, logs."""
        self.task.check_checkpoint(payload, path)
        self._check_layout_for_resume(payload)
        self._report_changes_on_resume(payload)
        self.task.load_state_dict(payload.get("task_state") or {})
        self.task.load_model_state_dict(payload["model_state_dict"])
        self.epoch = int(payload["epoch"])
        self.global_step = int(payload["global_step"])
        self.step_in_epoch = int(payload["step_in_epoch"])
        self.epoch_sums = {k: float(v) for k, v in (payload.get("epoch_sums") or {}).items()}
        self.best_value = (payload.get("best") or {}).get("value")
        self._build_optimization()
        assert self.optimizer is not None and self.scheduler is not None
        self.optimizer.load_state_dict(payload["optimizer_state_dict"])
        self.scheduler.load_state_dict(payload["lr_scheduler_state_dict"])
        if self.use_amp and payload.get("scaler_state_dict"):
            self.scaler.load_state_dict(payload["scaler_state_dict"])
        restore_rng_state(payload["rng_state"])
        self._load_logs()

    def _check_layout_for_resume(self, payload: Mapping[str, Any]) -> None:
        """Mid-epoch positions count micro-batches: the batch layout must not change inside an epoch."""
        args = payload.get("args") or {}
        before = (args.get("batch_size"), args.get("accumulate"), payload.get("world_size"))
        now = (self.settings.batch_size, self.settings.accumulate, self.env.world_size)
        if int(payload.get("step_in_epoch", 0)) > 0 and before != now:
            raise UsageError(f"the checkpoint stopped inside an epoch with batch size {before[0]}, accumulation "
                             f"{before[1]} on {before[2]} process(es); this run uses {now[0]}, {now[1]}, {now[2]}",
                             "resume with the same --batch-size, --accumulate and number of processes")
        if before != now:
            self._warn(f"batch layout changed on resume (batch, accumulate, processes): {before} → {now}")

    def _report_changes_on_resume(self, payload: Mapping[str, Any]) -> None:
        """Say which of this command's settings differ from the run's and are taken from the command."""
        saved_epochs = (payload.get("args") or {}).get("epochs")
        if saved_epochs is not None and int(saved_epochs) != self.settings.epochs:
            milestones = ",".join(str(m) for m in self.settings.lr_milestones) or "none"
            self._warn(f"resumed with --epochs {self.settings.epochs} (the run was started with {saved_epochs}); "
                       f"the lr milestones stay the run's ({milestones})")
        for message in self.task.changes_on_resume(payload.get("task_state") or {}):
            self._warn(message)
        saved_data = payload.get("data")
        if saved_data and saved_data.get("digest") != self._data_identity["digest"]:
            self._data_changed = True
            epoch, inside = int(payload.get("epoch", 0)), int(payload.get("step_in_epoch", 0))
            change = (f"the training data differ from the checkpoint's ({saved_data.get('samples')} → "
                      f"{self._data_identity['samples']} samples)")
            if inside > 0:  # the saved position counts steps through the old set's sample order
                self._warn(f"{change}; epoch {epoch + 1} ends after the {inside} step(s) it had, and training "
                           f"continues with epoch {epoch + 2} over the new set")
            else:
                self._warn(f"{change}; training continues with epoch {epoch + 1} over the new set")

    # ------------------------------------------------------------------ logs
    def _load_logs(self) -> None:
        """Keep only log lines up to the checkpoint (a crash may have logged steps that are now redone)."""
        self.step_records = [r for r in _read_jsonl(self.run_dir / STEPS_LOG) if r.get("step", 0) <= self.global_step]
        self.epoch_records = [r for r in _read_jsonl(self.run_dir / METRICS_LOG) if r.get("epoch", 0) <= self.epoch]
        if self.env.is_main:
            _write_jsonl(self.run_dir / STEPS_LOG, self.step_records)
            _write_jsonl(self.run_dir / METRICS_LOG, self.epoch_records)

    def _append_log(self, name: str, record: Mapping[str, Any]) -> None:
        if self.env.is_main:
            with open(self.run_dir / name, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(_finite_or_none(record)) + "\n")

    def _plot(self) -> None:
        if not self.env.is_main:
            return
        try:
            self.task.plot(self.step_records, self.epoch_records, self.run_dir / CURVES_PNG,
                           title=f"{self.task.name}: {self.run_dir.name}")
        except Exception as exc:  # noqa: BLE001 - a plot must never stop training
            self._warn(f"could not draw {CURVES_PNG}: {exc}")

    # ------------------------------------------------------------------ the loop
    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.settings.epochs
        return min(total, self.settings.max_steps) if self.settings.max_steps is not None else total

    def run(self, resume_payload: Mapping[str, Any] | None = None) -> TrainOutcome:
        """Train until the epochs are done or a stop condition; always ends with a checkpoint at the last step.

        resume_payload: the loaded `last.pth` of this run (see `load_training_checkpoint`) to continue from.
        """
        started = time.monotonic()
        resumed_from = None
        resume = resume_payload is not None
        if resume_payload is not None:
            self._restore(resume_payload, self.run_dir / LAST_CHECKPOINT)
            resumed_from = self.global_step
            self.log(f"resumed from {self.run_dir / LAST_CHECKPOINT}: epoch {self.epoch}, step {self.global_step}")
            if self.step_in_epoch > 0 and (self._data_changed or self.step_in_epoch >= self.steps_per_epoch):
                # A position inside an epoch of another sample set means nothing here (and one past the
                # new epoch's end would never be reached): close that epoch with the steps it had.
                with warnings.catch_warnings():  # the scheduler steps before this process's first optimizer step
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                    self._end_epoch(0.0)
        else:
            self._build_optimization()
            if self.env.is_main:
                _write_jsonl(self.run_dir / STEPS_LOG, [])
                _write_jsonl(self.run_dir / METRICS_LOG, [])
        self._saved_at_step = self.global_step if resume else -1
        stop_reason = "completed"
        with _GracefulStop(self.log) as stopper:
            while self.epoch < self.settings.epochs:
                reason = self._run_epoch(stopper, started)
                if reason is not None:
                    stop_reason = reason
                    break
        last = self.run_dir / LAST_CHECKPOINT
        if self._saved_at_step != self.global_step or not last.exists():
            self.save()
            self._plot()
        best = self.run_dir / BEST_CHECKPOINT
        return TrainOutcome(self.run_dir, self.epoch, self.global_step, stop_reason, last,
                            best if best.exists() else None, self.task.best_metric, self.best_value,
                            list(self.epoch_records), list(self.step_records), list(self.samples_seen),
                            time.monotonic() - started, resumed_from, self.warnings)

    def _stop_reason(self, stopper: _GracefulStop, started: float, interrupted_elsewhere: bool) -> str | None:
        if stopper.requested or interrupted_elsewhere:
            return "interrupted"
        if self.settings.max_steps is not None and self.global_step >= self.settings.max_steps:
            return "max_steps"
        if self._time_up:
            return "time_limit"
        return None

    def _run_epoch(self, stopper: _GracefulStop, started: float) -> str | None:
        """One epoch from `step_in_epoch`; returns a stop reason, or None when the epoch finished."""
        if self.settings.max_steps is not None and self.global_step >= self.settings.max_steps:
            return "max_steps"
        settings = self.settings
        self.task.dataset.set_epoch(self.epoch)  # type: ignore[attr-defined]
        self.sampler.set_epoch(self.epoch, skip=self.step_in_epoch * settings.accumulate * settings.batch_size)
        loader = DataLoader(self.task.dataset, batch_size=settings.batch_size, sampler=self.sampler,
                            num_workers=settings.workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        batches = iter(loader)
        epoch_started = time.monotonic()
        while self.step_in_epoch < self.steps_per_epoch:
            first_micro = self.step_in_epoch * settings.accumulate
            micro_count = min(settings.accumulate, self.micro_per_epoch - first_micro)
            step_started = time.monotonic()
            try:
                loss, metrics, samples = self._optimizer_step(batches, micro_count)
            except Exception:
                if stopper.requested:  # e.g. DataLoader workers killed by the same Ctrl-C: state is still at the last step
                    return "interrupted"
                raise
            self.global_step += 1
            self.step_in_epoch += 1
            self.samples_seen.extend(samples)
            self._time_up = (settings.time_limit_s is not None
                             and time.monotonic() - started >= settings.time_limit_s)
            # One reduction per step: metric sums, sample count and the stop flags of every rank.
            values = {"loss": loss, **metrics}
            keys = sorted(values)
            totals = all_reduce_sum([values[k] * len(samples) for k in keys]
                                    + [len(samples), float(stopper.requested or self._time_up), float(stopper.requested)],
                                    self.env, self.device)
            count = totals[len(keys)]
            record: dict[str, Any] = {"step": self.global_step,
                                      "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch}
            record.update({k: totals[i] / count for i, k in enumerate(keys)})
            record.update({"samples": int(count), "lr": self._learning_rates(),
                           "seconds": round(time.monotonic() - step_started, 3)})
            for i, key in enumerate(keys):
                self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + totals[i]
            self.epoch_sums["samples"] = self.epoch_sums.get("samples", 0.0) + count
            self.step_records.append(record)
            self._append_log(STEPS_LOG, record)
            if self.on_step is not None and self.env.is_main:
                self.on_step(record, self.total_steps)
            stop_any, interrupt_any = totals[len(keys) + 1], totals[len(keys) + 2]
            # Any rank asking to stop (time, Ctrl-C) stops every rank at this same step.
            self._time_up = self._time_up or stop_any > 0
            interrupted_elsewhere = interrupt_any > 0
            epoch_done = self.step_in_epoch >= self.steps_per_epoch
            if epoch_done:
                self._end_epoch(time.monotonic() - epoch_started)  # resets step_in_epoch
            elif settings.save_every_steps and self.global_step % settings.save_every_steps == 0:
                self.save()
            reason = self._stop_reason(stopper, started, interrupted_elsewhere)
            if reason is not None or epoch_done:
                return reason
        return None

    _time_up = False
    _saved_at_step = -1
    _data_changed = False

    def _optimizer_step(self, batches: Iterator[Mapping[str, Any]], micro_count: int
                        ) -> tuple[float, dict[str, float], list[int]]:
        """Accumulate gradients over `micro_count` micro-batches, then one optimizer step.

        Returns the mean (undivided) loss, mean metrics (weighted by batch size) and the sample indices used.
        """
        assert self.optimizer is not None and self.wrapped is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss_total, metric_totals, samples = 0.0, {}, []
        for micro in range(micro_count):
            batch = next(batches)
            batch = {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                     for k, v in batch.items()}
            size = int(batch["image"].shape[0]) if "image" in batch else 1
            context = StepContext(self.epoch, self.global_step, micro, self.env.rank, self.settings.seed, self.device)
            last_micro = micro == micro_count - 1
            sync = (self.wrapped.no_sync() if self.env.is_distributed and not last_micro  # type: ignore[operator]
                    else contextlib.nullcontext())
            with sync:
                with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
                    loss, metrics = self.wrapped(batch, context)
                self.scaler.scale(loss / micro_count).backward()
            loss_total += float(loss.detach()) * size
            for key, value in metrics.items():
                metric_totals[key] = metric_totals.get(key, 0.0) + float(value) * size
            indices = batch.get("sample_index")
            samples.extend(indices.tolist() if isinstance(indices, torch.Tensor) else [-1] * size)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        n = max(len(samples), 1)
        return loss_total / n, {k: v / n for k, v in metric_totals.items()}, samples

    def _end_epoch(self, seconds: float) -> None:
        """Epoch record, scheduler step, task hook (e.g. unfreeze → rebuild), checkpoints, plot."""
        assert self.optimizer is not None and self.scheduler is not None
        sums = self.epoch_sums
        count = max(sums.get("samples", 0.0), 1.0)
        record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.global_step}
        record.update({k: v / count for k, v in sorted(sums.items()) if k != "samples"})
        record.update({"samples": int(sums.get("samples", 0)), "lr": self._learning_rates(),
                       "trainable_params": sum(p.numel() for g in self.optimizer.param_groups for p in g["params"]),
                       "seconds": round(seconds, 2), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self.scheduler.step()
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_sums = {}
        if self.task.end_of_epoch(record, self.log):
            self._build_optimization()
        value = record.get(self.task.best_metric)
        improved = value is not None and math.isfinite(value) and (
            self.best_value is None
            or (value > self.best_value if self.task.best_mode == "max" else value < self.best_value))
        if improved:
            self.best_value = float(value)
        record["best"] = bool(improved)
        self.epoch_records.append(record)
        self._append_log(METRICS_LOG, record)
        self.save(best=improved)
        self._plot()
        shown = ", ".join(f"{k} {record[k]:.4f}" for k in ("loss", "dice") if k in record)
        self.log(f"epoch {record['epoch']}/{self.settings.epochs}: {shown}, {record['samples']} samples, "
                 f"{seconds:.0f} s" + (" (best)" if improved else ""))

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log(f"warning: {message}")

    def _learning_rates(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups] if self.optimizer else []


def load_training_checkpoint(path: Path, task_name: str, init_option: str = "--init") -> dict[str, Any]:
    """A training checkpoint written by this Trainer for `task_name` (safe load); WeightsError otherwise.

    `init_option` is the command's option that starts a new run from a checkpoint's weights (for the fix).
    """
    from fastsam3d_cli.model.checkpoint import load_payload

    payload = load_payload(path)
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a fastsam3d training checkpoint (no optimizer state to resume)",
                           f"start a new run with {init_option} CHECKPOINT to begin from its weights")
    if payload.get("task") != task_name:
        raise WeightsError(f"{path} was written by `{payload.get('task')}`, not `{task_name}`",
                           f"resume with the command that wrote it, or start a new run with {init_option}")
    return dict(payload)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return records


def _write_jsonl(path: Path, records: list[Mapping[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(_finite_or_none(r)) + "\n" for r in records))


def _finite_or_none(record: Mapping[str, Any]) -> dict[str, Any]:
    """NaN/inf → null, so the logs stay strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
