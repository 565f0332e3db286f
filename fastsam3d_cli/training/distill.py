"""`distill`: layer-wise progressive distillation of a SAM-Med3D teacher's image encoder into a student.

FastSAM3D's recipe (reference/models.md §5.2):

1. run the teacher once over the prepared crops and cache its block outputs and neck
   (`feature_cache.py`; FastSAM3D's `preparelabel`). The crop is the validation crop of `training_data`:
   canonical orientation, 128³ centred on the label's bounding box, z-normalised — no augmentation, since
   the targets are computed once;
2. train the student encoder in stages: stage k = 1..S makes student block k match teacher block k·(T/S)
   (MSE; 2, 4, …, 12 for the 12-block teacher and a 6-block student), stage S+1 matches the necks. One pair
   is active at a time, each stage lasts `epochs_per_stage` epochs, every student parameter up to the
   active block keeps training. When the student is narrower than the teacher (fastsam3d-tiny: 192 vs 768)
   a learned Linear(student width → teacher width) per block pair maps its tokens into the teacher's
   space for the loss only; the projections are not part of the saved student;
3. save `student.pth`: the student encoder plus the teacher's prompt encoder and mask decoder, in the
   official layout with the student's config, so `load_model` (infer / validate / benchmark) reads it.

The loop itself (optimizer, accumulation, DDP, exact resume, logs, checkpoints) is `trainer.Trainer`; this
module supplies the `DistillationTask`. The decoder is then fine-tuned on the student's features with
`train --init RUN_DIR/student.pth --freeze-encoder [--unfreeze-patience P]`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fastsam3d_cli.errors import BadInputError, Interrupted, UsageError, WeightsError
from fastsam3d_cli.training.feature_cache import (CacheIdentity, FeatureCache, cache_size_bytes, cached_blocks_for,
                                         check_cache_folder, sha256_file, write_feature_cache)
from fastsam3d_cli.model.config import ModelConfig
from fastsam3d_cli.model.image_encoder import ImageEncoderViT3D
from fastsam3d_cli.model.sam3d import Sam3D
from fastsam3d_cli.training.trainer import StepContext, Trainer, TrainingTask, TrainOutcome

# Encoder parts outside the block stack, copied from the teacher where shapes agree.
SHAREABLE_PREFIXES = ("patch_embed.", "pos_embed", "neck.")
STUDENT_CHECKPOINT = "student.pth"
STAGES_LOG = "stages.jsonl"
CACHE_SUBDIR = "teacher_features"
TASK_NAME = "distill"


# ----------------------------------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class Stage:
    """One distillation stage: student block `student_block` ↔ teacher block `teacher_block`, or the necks."""

    number: int  # 1-based
    student_block: int | None  # 1-based; None for the neck stage
    teacher_block: int | None

    @property
    def is_neck(self) -> bool:
        return self.student_block is None

    @property
    def target(self) -> str:
        """Name of the cached teacher tensor this stage matches (`block_N` or `neck`)."""
        return "neck" if self.is_neck else f"block_{self.teacher_block}"

    def describe(self) -> str:
        if self.is_neck:
            return "student neck ↔ teacher neck"
        return f"student block {self.student_block} ↔ teacher block {self.teacher_block}"


class StageSchedule:
    """Stages 1..S (block pairs) then S+1 (necks), each `epochs_per_stage` epochs long."""

    def __init__(self, teacher_depth: int, student_depth: int, epochs_per_stage: int) -> None:
        if epochs_per_stage < 1:
            raise UsageError(f"--epochs-per-stage must be at least 1 (got {epochs_per_stage})", "give a value >= 1")
        self.teacher_blocks = cached_blocks_for(teacher_depth, student_depth)
        self.epochs_per_stage = int(epochs_per_stage)
        self.stages = [Stage(k, k, t) for k, t in enumerate(self.teacher_blocks, start=1)]
        self.stages.append(Stage(student_depth + 1, None, None))

    @property
    def total_epochs(self) -> int:
        return len(self.stages) * self.epochs_per_stage

    def stage_for_epoch(self, epoch: int) -> Stage:
        """The stage that 0-based `epoch` belongs to."""
        if not 0 <= epoch < self.total_epochs:
            raise ValueError(f"epoch {epoch} is outside 0..{self.total_epochs - 1}")
        return self.stages[epoch // self.epochs_per_stage]

    def is_stage_end(self, epoch: int) -> bool:
        """True when 0-based `epoch` is the last epoch of its stage."""
        return (epoch + 1) % self.epochs_per_stage == 0


# ------------------------------------------------------------------------------------ compatibility
def check_compatible(teacher: ModelConfig, student: ModelConfig) -> None:
    """The student must see the same crops, produce the same embedding and share the decoder's shapes."""
    t, s = teacher.encoder, student.encoder
    problems = [f"{what} {a} vs {b}" for what, a, b in (
        ("crop size", t.img_size, s.img_size), ("patch size", t.patch_size, s.patch_size),
        ("embedding channels", t.out_chans, s.out_chans),
        ("prompt embedding width", teacher.prompt_embed_dim, student.prompt_embed_dim)) if a != b]
    decoder_fields = ("mask_in_chans", "num_multimask_outputs", "decoder_depth", "decoder_num_heads",
                      "decoder_mlp_dim", "decoder_attention_downsample", "iou_head_depth", "iou_head_hidden_dim")
    problems += [f"{name} {getattr(teacher, name)} vs {getattr(student, name)}" for name in decoder_fields
                 if getattr(teacher, name) != getattr(student, name)]
    if problems:
        raise WeightsError(f"teacher '{teacher.name}' and student '{student.name}' do not fit together "
                           f"({'; '.join(problems)})", "distil into a student that shares the teacher's decoder")
    cached_blocks_for(t.depth, s.depth)  # UsageError when the depths cannot be matched


# -------------------------------------------------------------------------------------- student init
def init_student_from_teacher(student: ImageEncoderViT3D, teacher: ImageEncoderViT3D,
                              freeze: bool = False) -> list[str]:
    """Copy the teacher's patch embedding, position embedding and neck tensors whose shapes match.

    For a student as wide as the teacher (fastsam3d) that is all of them; for fastsam3d-tiny only the
    neck's 384-channel tail (neck.1–3). With `freeze` the copied tensors are not trained (as the early
    FastSAM3D variants did). Returns the copied names (relative to the encoder).
    """
    teacher_state = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for name, param in student.named_parameters():
            if not name.startswith(SHAREABLE_PREFIXES):
                continue
            source = teacher_state.get(name)
            if source is not None and tuple(source.shape) == tuple(param.shape):
                param.copy_(source.to(param.device, param.dtype))
                param.requires_grad_(not freeze)
                copied.append(name)
    return copied


# ---------------------------------------------------------------------------------- the trained model
class DistillationModel(Sam3D):
    """The student Sam3D (encoder trained; prompt encoder and decoder the teacher's, frozen) plus projections.

    `projections.<k>` (k = student block, 1-based) is a Linear(student width → teacher width), present only
    when the widths differ; it exists for the loss and is left out of `student_state_dict()`. Being a
    Sam3D keeps the training checkpoint (`last.pth`) in the official key layout.
    """

    def __init__(self, config: ModelConfig, teacher_width: int, schedule: StageSchedule) -> None:
        super().__init__(config)
        width = config.encoder.embed_dim
        self.projections = nn.ModuleDict()
        if width != teacher_width:
            for stage in schedule.stages:
                if not stage.is_neck:
                    self.projections[str(stage.student_block)] = nn.Linear(width, teacher_width)
        for module in (self.prompt_encoder, self.mask_decoder):
            module.requires_grad_(False)

    def forward_stage(self, volume: torch.Tensor, stage: Stage) -> torch.Tensor:
        """The student's output for `stage`, in the teacher's space.

        volume (B, 1, S, S, S) → (B, G, G, G, teacher width) for a block stage (channels last, like the
        cache), or (B, out_chans, G, G, G) for the neck stage. Only blocks up to the stage's block run.
        """
        encoder = self.image_encoder
        x = encoder.patch_embed(volume) + encoder.pos_embed
        last = len(encoder.blocks) if stage.is_neck else stage.student_block
        for block in encoder.blocks[:last]:
            x = block(x)
        if stage.is_neck:
            return encoder.neck(x.permute(0, 4, 1, 2, 3))
        key = str(stage.student_block)
        return self.projections[key](x) if key in self.projections else x

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of the plain student Sam3D (no projections), on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if not k.startswith("projections.")}


def distillation_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (torch MSELoss, reduction mean — FastSAM3D's loss)."""
    return F.mse_loss(prediction.float(), target.float())


def teacher_intermediates(teacher: ImageEncoderViT3D, volume: torch.Tensor,
                          blocks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Teacher outputs for a batch of crops: `block_N` (B, G, G, G, C) for each N in `blocks`, and `neck`."""
    with torch.inference_mode():
        neck, outputs = teacher.forward_with_intermediates(volume, blocks)
    return {**{f"block_{n}": outputs[n] for n in blocks}, "neck": neck}


# ------------------------------------------------------------------------------------------ the data
class CachedFeatureDataset(Dataset):
    """Items of a feature cache for the current stage: `image` (1, S, S, S), `target`, `sample_index`.

    `set_epoch(e)` selects the stage of epoch e (the Trainer calls it before each epoch). The memory maps
    are opened lazily in each process, so the dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self, cache_dir: Path, identity: CacheIdentity, schedule: StageSchedule) -> None:
        self.cache_dir, self.identity, self.schedule = Path(cache_dir), identity, schedule
        self.stage = schedule.stages[0]
        self._cache: FeatureCache | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    @property
    def cache(self) -> FeatureCache:
        if self._cache is None:
            self._cache = FeatureCache(self.cache_dir, self.identity)
        return self._cache

    def set_epoch(self, epoch: int) -> None:
        self.stage = self.schedule.stage_for_epoch(min(int(epoch), self.schedule.total_epochs - 1))

    def __len__(self) -> int:
        return len(self.identity.sample_ids)

    def describe(self, index: int) -> str:
        return self.identity.sample_ids[index]

    def item(self, index: int, stage: Stage) -> dict[str, torch.Tensor | int]:
        image = np.asarray(self.cache.array("crop")[index], dtype=np.float32)
        target = np.asarray(self.cache.array(stage.target)[index], dtype=np.float32)
        return {"image": torch.from_numpy(image), "target": torch.from_numpy(target), "sample_index": int(index)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return self.item(index, self.stage)


# ------------------------------------------------------------------------------------------ the task
class DistillationTask(TrainingTask):
    """The `TrainingTask` of `fastsam3d distill`: per-step MSE of the active stage's pair.

    At the end of each stage it measures, over every cached sample with the weights of that moment, the
    stage's MSE (`stage_end_mse`), the next stage's MSE before it starts (`stage_start_mse` of the next), and
    the neck MSE (the distance of the student's embedding to the teacher's). These are added to that epoch's
    record in metrics.jsonl and summarised per stage in stages.jsonl.
    """

    name = TASK_NAME
    best_metric = "neck_mse"  # only stage-end epochs carry it: best.pth = the closest embedding so far
    best_mode = "min"

    def __init__(self, model: DistillationModel, dataset: CachedFeatureDataset, schedule: StageSchedule,
                 teacher_identity: Mapping[str, Any], env: Any, device: torch.device,
                 eval_batch_size: int = 1, run_dir: Path | None = None) -> None:
        self.model, self.dataset, self.schedule = model, dataset, schedule
        self.teacher_identity = dict(teacher_identity)
        self.env, self.device, self.eval_batch_size, self.run_dir = env, device, int(eval_batch_size), run_dir
        self.evaluations: dict[str, dict[str, float]] = {}  # stage number → start/end MSE
        self.neck_mse_init: float | None = None
        self.neck_mse_last: float | None = None
        self.epoch_losses: dict[str, list[float]] = {}  # stage number → mean training loss of each epoch
        self.log: Callable[[str], None] = lambda message: None
        self._announced = 0  # the stage whose start was logged

    # ---- training
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        encoder = [p for p in self.model.image_encoder.parameters() if p.requires_grad]
        projections = [p for p in self.model.projections.parameters() if p.requires_grad]
        groups = [{"params": encoder, "lr": lr, "name": "image_encoder"}]
        if projections:
            groups.append({"params": projections, "lr": lr, "name": "projections"})
        return groups

    def step(self, batch: Mapping[str, Any], context: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        stage = self.schedule.stage_for_epoch(context.epoch)
        if stage.number != self._announced:
            self._announced = stage.number
            self.log(f"stage {stage.number}/{len(self.schedule.stages)}: {stage.describe()}")
        prediction = self.model.forward_stage(batch["image"], stage)
        return distillation_loss(prediction, batch["target"]), {"stage": float(stage.number)}

    # ---- measuring
    @torch.no_grad()
    def measure(self, stage: Stage) -> float:
        """MSE of `stage`'s pair over every cached sample (this rank's share, summed over ranks)."""
        from fastsam3d_cli.training.distributed import all_reduce_sum

        indices = list(range(self.env.rank, len(self.dataset), self.env.world_size))
        total = 0.0
        for start in range(0, len(indices), self.eval_batch_size):
            items = [self.dataset.item(i, stage) for i in indices[start:start + self.eval_batch_size]]
            image = torch.stack([it["image"] for it in items]).to(self.device)
            target = torch.stack([it["target"] for it in items]).to(self.device)
            prediction = self.model.forward_stage(image, stage).float()
            total += float(((prediction - target) ** 2).flatten(1).mean(1).sum())
        summed, count = all_reduce_sum([total, float(len(indices))], self.env, self.device)
        return summed / max(count, 1.0)

    def measure_start(self) -> None:
        """Before any training: stage 1's MSE and the neck MSE at initialisation."""
        first = self.schedule.stages[0]
        self.evaluations.setdefault(str(first.number), {})["start_mse"] = self.measure(first)
        self.neck_mse_init = self.measure(self.schedule.stages[-1])

    def plot(self, step_records: list[dict[str, Any]], epoch_records: list[dict[str, Any]], path: Path,
             title: str) -> None:
        """Per-step MSE coloured by stage, and each stage's MSE before/after (instead of loss/Dice curves)."""
        plot_distillation(step_records, self.stage_summaries(), path,
                          f"distill {self.teacher_identity['name']} → {self.model.config.name}: {path.parent.name}")

    def end_of_epoch(self, record: dict[str, Any], log: Callable[[str], None]) -> bool:
        epoch = int(record["epoch"]) - 1
        stage = self.schedule.stage_for_epoch(epoch)
        self.epoch_losses.setdefault(str(stage.number), []).append(float(record["loss"]))
        stages = self.schedule.stages
        extra: dict[str, Any] = {"stage": stage.number, "stage_pair": stage.describe()}
        if self.schedule.is_stage_end(epoch):
            result = self.evaluations.setdefault(str(stage.number), {})
            result["end_mse"] = self.measure(stage)
            self.neck_mse_last = result["end_mse"] if stage.is_neck else self.measure(stages[-1])
            extra.update({"stage_start_mse": result.get("start_mse"), "stage_end_mse": result["end_mse"],
                          "neck_mse": self.neck_mse_last})
            log(f"stage {stage.number}/{len(stages)} done ({stage.describe()}): MSE "
                f"{_fmt(result.get('start_mse'))} → {_fmt(result['end_mse'])}; neck MSE {_fmt(self.neck_mse_last)}")
            if stage.number < len(stages):
                following = stages[stage.number]
                self.evaluations.setdefault(str(following.number), {})["start_mse"] = self.measure(following)
            self.write_stages_log()
        if isinstance(record, dict):
            record.update(extra)  # the Trainer appends this record to metrics.jsonl after this hook
        return False

    def stage_summaries(self) -> list[dict[str, Any]]:
        """One dict per stage that has started: pair, epochs, MSE before/after, first/last epoch loss."""
        out = []
        for stage in self.schedule.stages:
            key = str(stage.number)
            if key not in self.evaluations and key not in self.epoch_losses:
                continue
            losses = self.epoch_losses.get(key, [])
            result = self.evaluations.get(key, {})
            out.append({"stage": stage.number, "pair": stage.describe(), "target": stage.target,
                        "epochs_done": len(losses), "start_mse": result.get("start_mse"),
                        "end_mse": result.get("end_mse"), "first_epoch_loss": losses[0] if losses else None,
                        "last_epoch_loss": losses[-1] if losses else None})
        return out

    def write_stages_log(self) -> None:
        """Rewrite stages.jsonl from the task state (so it always agrees with the checkpoint on resume)."""
        if self.run_dir is None or not self.env.is_main:
            return
        from fastsam3d_cli.imaging.atomic import write_text_atomic

        lines = [json.dumps(_finite_or_none(s)) for s in self.stage_summaries() if s["end_mse"] is not None]
        write_text_atomic(self.run_dir / STAGES_LOG, "".join(line + "\n" for line in lines))

    # ---- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "neck_mse_init": self.neck_mse_init,
                "neck_mse_last": self.neck_mse_last, "epoch_losses": self.epoch_losses,
                "epochs_per_stage": self.schedule.epochs_per_stage}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("epochs_per_stage", self.schedule.epochs_per_stage) != self.schedule.epochs_per_stage:
            raise UsageError(f"the run was started with --epochs-per-stage {state['epochs_per_stage']}",
                             f"resume with --epochs-per-stage {state['epochs_per_stage']}")
        self.evaluations = {str(k): dict(v) for k, v in (state.get("evaluations") or {}).items()}
        self.neck_mse_init = state.get("neck_mse_init")
        self.neck_mse_last = state.get("neck_mse_last")
        self.epoch_losses = {str(k): list(v) for k, v in (state.get("epoch_losses") or {}).items()}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"preset": self.model.config.name, "config": self.model.config.to_dict(),
                "teacher": self.teacher_identity}

    def check_checkpoint(self, payload: Mapping[str, Any], path: Path) -> None:
        check_resume_payload(payload, self.model.config, self.teacher_identity["sha256"], path)

    def sample_names(self, indices: list[int]) -> list[str]:
        return [self.dataset.describe(i) for i in indices]


def check_resume_payload(payload: Mapping[str, Any], student: ModelConfig, teacher_sha256: str, path: Path,
                         epochs_per_stage: int | None = None) -> None:
    """A checkpoint to resume must be of this student (WeightsError), schedule (UsageError) and teacher (WeightsError)."""
    if payload.get("config") != student.to_dict():
        raise WeightsError(f"{path} is a distillation into student '{payload.get('preset')}', not '{student.name}'",
                           f"resume with --student {payload.get('preset')}, or start a new run")
    stages = (payload.get("task_state") or {}).get("epochs_per_stage")
    if epochs_per_stage is not None and stages is not None and stages != epochs_per_stage:
        raise UsageError(f"{path} was written with --epochs-per-stage {stages}, not {epochs_per_stage}",
                         f"resume with --epochs-per-stage {stages}")
    teacher = payload.get("teacher") or {}
    if teacher.get("sha256") != teacher_sha256:
        raise WeightsError(f"{path} was distilled from another teacher (sha256 {str(teacher.get('sha256'))[:12]}…)",
                           "resume with the same --teacher checkpoint, or start a new run")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.5g}"


def _finite_or_none(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


# ------------------------------------------------------------------------------------------ the plot
def plot_distillation(steps: Sequence[Mapping[str, Any]], stages: Sequence[Mapping[str, Any]], path: Path,
                      title: str) -> None:
    """train.png of a distillation: per-step MSE coloured by stage (top), MSE before/after each stage (bottom)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from fastsam3d_cli.imaging.atomic import atomic_path

    figure, (loss_axis, stage_axis) = plt.subplots(2, 1, figsize=(7.5, 6.5))
    colours = plt.get_cmap("tab10")
    for number in sorted({int(s.get("stage", 0)) for s in steps}):
        points = [(s["step"], s["loss"]) for s in steps if int(s.get("stage", 0)) == number
                  and isinstance(s.get("loss"), (int, float)) and math.isfinite(s["loss"]) and s["loss"] > 0]
        if points:
            loss_axis.plot(*zip(*points), lw=0.9, color=colours((number - 1) % 10), label=f"stage {number}")
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("MSE of the active pair (per step)")
    loss_axis.set_title(title)
    loss_axis.grid(alpha=0.3)
    if steps:
        loss_axis.legend(loc="upper right", fontsize=7, ncol=4)
    done = [s for s in stages if s.get("end_mse") is not None and s.get("start_mse") is not None]
    if done:
        numbers = [s["stage"] for s in done]
        width = 0.38
        stage_axis.bar([n - width / 2 for n in numbers], [s["start_mse"] for s in done], width, label="before the stage",
                       color="tab:gray")
        stage_axis.bar([n + width / 2 for n in numbers], [s["end_mse"] for s in done], width, label="after the stage",
                       color="tab:green")
        stage_axis.set_xticks(numbers, [("neck" if s["target"] == "neck" else f"{s['stage']}↔{s['target'][6:]}")
                                        for s in done])
        stage_axis.set_yscale("log")
        stage_axis.legend(loc="upper right", fontsize=8)
    stage_axis.set_xlabel("stage (student block ↔ teacher block)")
    stage_axis.set_ylabel("MSE over all samples")
    stage_axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    with atomic_path(Path(path)) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------ the cache step
def sample_id(sample: Any) -> str:
    """Stable id of a prepared sample in the cache: class/dataset/case."""
    return f"{sample.class_name}/{sample.dataset}/{sample.case}"


def build_teacher_cache(samples: Sequence[Any], teacher: Sam3D, identity: CacheIdentity, directory: Path,
                        device: torch.device, progress: Callable[[int, int], None] | None = None
                        ) -> tuple[FeatureCache, int]:
    """Run the teacher over the validation crops of `samples` and write (or finish) the cache."""
    from fastsam3d_cli.data.training_data import load_sample, validation_crop

    blocks = identity.blocks

    def compute(index: int) -> dict[str, np.ndarray]:
        sample = samples[index]
        crop = validation_crop(load_sample(sample), identity.crop_size)
        if crop is None:
            raise BadInputError(f"{sample.label_path}: the label is empty",
                                "re-run fastsam3d prepare (it never writes empty labels)")
        volume = torch.from_numpy(crop.image)[None, None].to(device)
        features = teacher_intermediates(teacher.image_encoder, volume, blocks)
        return {"crop": crop.image[None], **{k: v[0].float().cpu().numpy() for k, v in features.items()}}

    return write_feature_cache(directory, identity, compute, progress)


# ------------------------------------------------------------------------------------------ the API
@dataclass
class DistillResult:
    """Summary of a `distill` call (on this rank)."""

    run_dir: Path
    student: str
    teacher: dict[str, Any]
    device: str
    world_size: int
    rank: int
    samples: int
    cache_dir: Path
    cache_bytes: int
    cache_dtype: str
    cache_computed: int  # samples the teacher ran on in this call (0 when the cache was reused)
    copied_from_teacher: list[str]
    stages: list[dict[str, Any]]
    neck_mse_init: float | None
    neck_mse_final: float | None
    student_checkpoint: Path | None  # None until every stage has finished
    outcome: TrainOutcome
    warnings: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_json(self) -> dict[str, Any]:
        o = self.outcome
        return {"run_dir": str(self.run_dir), "student": self.student, "teacher": self.teacher,
                "device": self.device, "processes": self.world_size, "samples": self.samples,
                "cache": {"dir": str(self.cache_dir), "bytes": self.cache_bytes, "dtype": self.cache_dtype,
                          "computed_now": self.cache_computed},
                "copied_from_teacher": self.copied_from_teacher, "stages": self.stages,
                "neck_mse": {"init": self.neck_mse_init, "final": self.neck_mse_final},
                "epochs_completed": o.epochs_completed, "global_step": o.global_step, "stop_reason": o.stop_reason,
                "resumed_from_step": o.resumed_from_step,
                "student_checkpoint": str(self.student_checkpoint) if self.student_checkpoint else None,
                "checkpoints": {"last": str(o.last_checkpoint) if o.last_checkpoint else None},
                "wall_s": round(o.wall_s, 2), "warnings": self.warnings}


def _resolve_config(model: str | ModelConfig) -> ModelConfig:
    from fastsam3d_cli.model.config import get_config

    return get_config(model) if isinstance(model, str) else model


def distill(prepared_dirs: Sequence[str | Path], teacher: str | Path, *, student: str | ModelConfig = "fastsam3d-tiny",
            teacher_model: str | None = "sam-med3d", student_init: str | Path | None = None,
            cache_features: str | Path | None = None, cache_dtype: str = "float16", epochs_per_stage: int = 3,
            output: str | Path | None = None, resume: bool = False, init_from_teacher: bool | None = None,
            freeze_copied: bool = False, lr: float | None = None, weight_decay: float | None = None,
            batch_size: int = 1, accumulate: int = 1, lr_milestones: Sequence[int] | None = None,
            lr_gamma: float | None = None, workers: int = 0, seed: int | None = None, device: str = "auto",
            attention: str = "auto", amp: bool = False,
            classes: Sequence[str] | None = None, max_samples: int | None = None, max_steps: int | None = None,
            time_limit_s: float | None = None, save_every_steps: int | None = None,
            log: Callable[[str], None] | None = None, on_cache: Callable[[int, int], None] | None = None,
            on_step: Callable[[dict[str, Any], int], None] | None = None) -> DistillResult:
    """Cache the teacher's features, distil stage by stage, save the full student checkpoint.

    `teacher_model` is the teacher's preset (None: inferred from the checkpoint, e.g. a custom config saved
    by this tool); `student` a preset name or a ModelConfig. `student_init` starts the student encoder from a
    checkpoint (full, or encoder-only as FastSAM3D's distillation writes). `init_from_teacher` (default: on
    unless `student_init` is given) copies the teacher's patch/position embeddings and neck wherever the
    shapes match — all of them for fastsam3d, the neck's 384-channel tail for fastsam3d-tiny (on resume the
    checkpoint's weights win); `freeze_copied` keeps the copied tensors fixed. `lr`, `weight_decay`,
    `lr_milestones`, `lr_gamma` and `seed` left None take the defaults (8e-4, 0.1, none, 0.1, 2023); a resumed
    run keeps its own and warns about any given that differ.
    Everything is checked before anything is written: bad numbers → UsageError (2); missing/empty data, an
    unwritable or already used run folder, a cache of another teacher/crop size/sample set → BadInputError
    (3); a teacher or student checkpoint of the wrong preset → WeightsError (4). A full disk while caching
    → BadInputError, the cache cut back to its last whole sample (resumable). Under torchrun rank 0 writes
    the cache and the run folder; every rank trains its share.
    """
    from fastsam3d_cli.training import distributed
    from fastsam3d_cli.device import resolve_device
    from fastsam3d_cli.model.checkpoint import load_model
    from fastsam3d_cli.data.prepared import list_prepared_samples
    from fastsam3d_cli.data.training_data import (all_labels_empty_error, empty_label_warnings, label_voxels,
                                             run_warnings)
    from fastsam3d_cli.training.train import check_numbers, check_run_dir
    from fastsam3d_cli.training.trainer import (LAST_CHECKPOINT, RECIPE_DEFAULTS, TrainerSettings, load_training_checkpoint,
                                       recipe_for_run)

    check_numbers(batch_size=batch_size, accumulate=accumulate, workers=workers, max_steps=max_steps, lr=lr,
                   time_limit_s=time_limit_s, save_every_steps=save_every_steps)
    if epochs_per_stage < 1:
        raise UsageError(f"--epochs-per-stage must be at least 1 (got {epochs_per_stage})", "give a value >= 1")
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"--max-samples must be at least 1 (got {max_samples})", "give a value >= 1")
    from fastsam3d_cli.device import check_attention_name

    check_attention_name(attention)  # a usage error, before the data, teacher and cache checks
    student_config = _resolve_config(student)
    env = distributed.detect_environment()
    torch_device = distributed.device_for_rank(env, resolve_device(device))
    if not prepared_dirs:
        raise UsageError("no PREPARED_DIR given", "give at least one folder written by fastsam3d prepare")
    samples = [s for folder in prepared_dirs for s in list_prepared_samples(Path(folder), classes=classes)]
    if max_samples is not None:
        samples = samples[:max_samples]
    # Empty labels are left out with a warning (the teacher needs a crop around foreground); none left → exit 3.
    voxels = [label_voxels(s) for s in samples]
    empty = [s for s, n in zip(samples, voxels) if n == 0]
    if samples and len(empty) == len(samples):
        raise all_labels_empty_error(empty, "distil")
    samples = [s for s, n in zip(samples, voxels) if n != 0]
    run_path = (Path(output) if output is not None else _default_run_dir(student_config.name)).expanduser().absolute()
    cache_dir = Path(cache_features).expanduser().absolute() if cache_features else run_path / CACHE_SUBDIR
    # A run stopped while caching teacher features has its cache but no last.pth: --resume continues the cache
    # and starts training (there is no step to resume), as the interruption message says.
    cache_only = resume and run_path.is_dir() and not (run_path / LAST_CHECKPOINT).exists() and cache_dir.is_dir()
    resume = resume and not cache_only
    run_dir = check_run_dir(run_path, resume)
    warnings = empty_label_warnings(empty) + run_warnings(samples, amp, torch_device)
    if cache_only:
        warnings.append(f"--resume: {run_dir} stopped while caching teacher features (no {LAST_CHECKPOINT} yet); "
                        "the cache continues where it stopped and training starts at step 1")

    # Teacher and student weights (exit 4 on any mismatch), before anything is written.
    # The teacher always runs a fast exact-equivalent backend (sdpa/flash): `exact` is ~10× slower on windows.
    teacher_net, _ = load_model(teacher, preset=teacher_model, device="cpu", attention="auto",
                                model_option="--teacher-model")
    teacher_config = teacher_net.config
    check_compatible(teacher_config, student_config)
    schedule = StageSchedule(teacher_config.encoder.depth, student_config.encoder.depth, epochs_per_stage)
    # The same initial student (and projections) on every rank and every rerun (a resumed run loads its own).
    torch.manual_seed(RECIPE_DEFAULTS["seed"] if seed is None else seed)
    model = DistillationModel(student_config, teacher_config.encoder.embed_dim, schedule)
    model.set_attention(attention, torch_device)  # an unusable backend is a usage/device error now, not later
    if student_init is not None:
        model.image_encoder.load_state_dict(read_student_encoder(student_init, student_config))
    if init_from_teacher is None:
        init_from_teacher = student_init is None
    copied = (init_student_from_teacher(model.image_encoder, teacher_net.image_encoder, freeze_copied)
              if init_from_teacher else [])
    teacher_state = teacher_net.state_dict()
    model.prompt_encoder.load_state_dict({k[len("prompt_encoder."):]: v for k, v in teacher_state.items()
                                          if k.startswith("prompt_encoder.")})
    model.mask_decoder.load_state_dict({k[len("mask_decoder."):]: v for k, v in teacher_state.items()
                                        if k.startswith("mask_decoder.")})
    teacher_sha = sha256_file(teacher)
    teacher_identity = {"sha256": teacher_sha, "name": teacher_config.name, "path": str(Path(teacher).absolute())}
    identity = CacheIdentity(teacher_sha256=teacher_sha, teacher_name=teacher_config.name,
                             teacher_config=teacher_config.to_dict(), crop_size=teacher_config.image_size,
                             blocks=schedule.teacher_blocks, dtype=cache_dtype,
                             sample_ids=tuple(sample_id(s) for s in samples))
    if len(set(identity.sample_ids)) != len(identity.sample_ids):
        raise BadInputError("two prepared folders hold the same class/dataset/case",
                            "give each sample once (distinct prepared folders or --classes)")
    resume_payload = None
    if resume:
        resume_payload = load_training_checkpoint(run_dir / LAST_CHECKPOINT, TASK_NAME, init_option="--student-init")
        check_resume_payload(resume_payload, student_config, teacher_sha, run_dir / LAST_CHECKPOINT, epochs_per_stage)
    check_cache_folder(cache_dir, identity)  # another teacher / crop size / sample set → exit 3, up front
    recipe, recipe_warnings = recipe_for_run(resume_payload, lr=lr, weight_decay=weight_decay, lr_gamma=lr_gamma,
                                             seed=seed, lr_milestones=lr_milestones, default_milestones=())
    warnings = recipe_warnings + warnings

    created = distributed.init_process_group(env, torch_device)
    try:
        emit = distributed.rank_aware(log, env)
        computed = 0
        if env.is_main:
            computed = _cache_teacher_features(samples, teacher_net, identity, cache_dir, run_dir, torch_device,
                                               emit, on_cache)
        del teacher_net
        distributed.barrier(env)
        for warning in warnings:
            emit(f"warning: {warning}")
        model.to(torch_device).train()
        model.set_attention(attention, torch_device)
        dataset = CachedFeatureDataset(cache_dir, identity, schedule)
        task = DistillationTask(model, dataset, schedule, teacher_identity, env, torch_device,
                                eval_batch_size=batch_size, run_dir=run_dir)
        settings = TrainerSettings(run_dir=run_dir, epochs=schedule.total_epochs, batch_size=batch_size,
                                   accumulate=accumulate, lr=float(recipe["lr"]),
                                   weight_decay=float(recipe["weight_decay"]),
                                   lr_milestones=tuple(int(m) for m in recipe["lr_milestones"]),
                                   lr_gamma=float(recipe["lr_gamma"]), amp=amp, workers=workers,
                                   seed=int(recipe["seed"]), max_steps=max_steps,
                                   time_limit_s=time_limit_s, save_every_steps=save_every_steps)
        emit(f"distilling {teacher_config.name} → {student_config.name}: {len(schedule.stages)} stages × "
             f"{epochs_per_stage} epoch(s), {len(dataset)} sample(s), {torch_device}, {env.world_size} process(es)"
             f" → {run_dir}")
        if copied:
            emit(f"copied from the teacher: {', '.join(sorted({c.split('.')[0] for c in copied}))} "
                 f"({len(copied)} tensors{', frozen' if freeze_copied else ''})")
        trainer = Trainer(task, settings, torch_device, env, log=emit, on_step=on_step)
        task.log = emit
        if not resume:
            task.measure_start()
            emit(f"neck MSE at start {_fmt(task.neck_mse_init)}; stage 1 MSE at start "
                 f"{_fmt(task.evaluations['1']['start_mse'])}")
        outcome = trainer.run(resume_payload)
        student_path = None
        if outcome.epochs_completed >= schedule.total_epochs:
            student_path = run_dir / STUDENT_CHECKPOINT
            if env.is_main:
                _save_student(student_path, model, teacher_identity, schedule, task)
                emit(f"student checkpoint: {student_path}")
        distributed.barrier(env)
    finally:
        distributed.cleanup(created)
    size = cache_size_bytes(cache_dir) if cache_dir.is_dir() else 0
    return DistillResult(run_dir, student_config.name, teacher_identity, str(torch_device), env.world_size, env.rank,
                         len(dataset), cache_dir, size, cache_dtype, computed, copied, task.stage_summaries(),
                         task.neck_mse_init, task.neck_mse_last, student_path, outcome, warnings + outcome.warnings)


def _cache_teacher_features(samples: Sequence[Any], teacher_net: Sam3D, identity: CacheIdentity, cache_dir: Path,
                            run_dir: Path, device: torch.device, emit: Callable[[str], None],
                            on_cache: Callable[[int, int], None] | None) -> int:
    """Rank 0: create the run folder, fill the cache; an empty run folder it created is removed on failure."""
    from fastsam3d_cli.training.train import make_run_dir

    made_run_dir = not run_dir.exists()
    make_run_dir(run_dir)
    try:
        teacher_net.to(device)
        teacher_net.set_attention("auto", device)
        emit(f"teacher features: {len(samples)} sample(s) → {cache_dir}")
        cache, computed = build_teacher_cache(samples, teacher_net, identity, cache_dir, device, on_cache)
    except BaseException as exc:
        if made_run_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        if isinstance(exc, KeyboardInterrupt) and cache_dir.is_dir():
            raise Interrupted(f"interrupted while caching teacher features: the features cached so far are kept "
                              f"in {cache_dir} (no training step was run)",
                              "run the same command again (with or without --resume) to continue the cache and "
                              "start training") from None
        raise
    emit(f"teacher feature cache: {len(cache)} sample(s), {cache.size_bytes / 1e6:.1f} MB ({identity.dtype}), "
         f"{computed} computed now")
    return computed


def read_student_encoder(path: str | Path, student: ModelConfig) -> dict[str, torch.Tensor]:
    """The image-encoder weights of a full or encoder-only checkpoint, checked against `student` (WeightsError).

    Keys are returned relative to the encoder (`blocks.0.…`), as float32.
    """
    from fastsam3d_cli.model.checkpoint import config_shapes, infer_preset, read_checkpoint_info, state_dict_diff

    state, _ = read_checkpoint_info(path)
    encoder = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
    expected = {k: s for k, s in config_shapes(student).items() if k.startswith("image_encoder.")}
    actual = {k: tuple(v.shape) for k, v in encoder.items()}
    if expected != actual:
        guess = infer_preset(encoder, encoder_only=True)
        raise WeightsError(f"--student-init {path} does not fit model '{student.name}'",
                           f"it looks like a '{guess}' encoder: use --student {guess}" if guess and guess != student.name
                           else f"give a {student.name} checkpoint", details=state_dict_diff(expected, actual))
    return {k[len("image_encoder."):]: v.float() for k, v in encoder.items()}


def _default_run_dir(preset: str) -> Path:
    from datetime import datetime

    return Path("runs") / f"distill-{preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _save_student(path: Path, model: DistillationModel, teacher_identity: Mapping[str, Any],
                  schedule: StageSchedule, task: DistillationTask) -> None:
    """The full student checkpoint: `{'model_state_dict', 'config', 'preset', 'distillation'}`, atomically."""
    from fastsam3d_cli.model.checkpoint import save_checkpoint

    save_checkpoint(path, model.student_state_dict(), config=model.config.to_dict(), preset=model.config.name,
                    distillation={"teacher": dict(teacher_identity), "epochs_per_stage": schedule.epochs_per_stage,
                                  "stages": [_finite_or_none(s) for s in task.stage_summaries()],
                                  "neck_mse_init": task.neck_mse_init, "neck_mse_final": task.neck_mse_last})
