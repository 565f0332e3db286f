"""`fastsam3d train`: interactive training with simulated clicks on prepared data (API: `fastsam3d_cli.train.train`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from fastsam3d_cli.cli.common import (ProgressBars, cli_errors, finish_training_command, log_to_stderr,
                                      progress_enabled, state, stdout_console)

EPILOG = (
    "Examples:\n\n"
    "  fastsam3d train prepared --model fastsam3d-tiny -o runs/tiny --epochs 20\n\n"
    "  fastsam3d train prepared --model fastsam3d --init FastSAM3D.pth --freeze-encoder --lr 8e-5 -o runs/ft\n\n"
    "  fastsam3d train prepared --model fastsam3d-tiny -o runs/tiny --resume          (continue exactly)\n\n"
    "  fastsam3d train prepared --model fastsam3d-tiny -o runs/mix --data-mix real=0.3,synth-labels=0.3,shapes=0.3,"
    "supervoxels=0.1 --label-maps Dataset501_AbdomenCT --samples-per-epoch 400\n\n"
    "  torchrun --nproc-per-node 4 -m fastsam3d_cli train prepared --model sam-med3d -o runs/teacher --amp\n\n"
    "Writes RUN_DIR/last.pth and best.pth (official checkpoint layout + optimizer, scheduler, RNG states, config), "
    "metrics.jsonl (per epoch), steps.jsonl (per step) and train.png. Ctrl-C stops after the current step and "
    "saves last.pth.\n\n"
    "Exit codes: 0 ok, 2 usage, 3 bad input (dataset, run folder, --resume without a checkpoint), "
    "4 weights (checkpoint of another model), 5 device, 130 interrupted."
)
RECIPE = "Recipe"
RUN = "Run control"
DATA = "Data"


def _int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    from fastsam3d_cli.errors import UsageError

    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a comma-separated list of integers", f"e.g. {option} 60,90") from None


def register(app: typer.Typer) -> None:
    """Add the `train` command to the app."""

    @app.command("train", epilog=EPILOG)
    @cli_errors
    def train(
        prepared_dirs: List[Path] = typer.Argument(..., metavar="PREPARED_DIR",
                                                   help="Folders written by `fastsam3d prepare`."),
        model: str = typer.Option(..., "--model", "-m", help="sam-med3d, fastsam3d, fastsam3d-tiny or "
                                  "fastsam3d-tiny-refine (with a refine head: needs --prior classical)."),
        init: Optional[Path] = typer.Option(None, "--init", metavar="CHECKPOINT",
                                            help="Start from these weights (must fit --model).", rich_help_panel=RECIPE),
        freeze_encoder: bool = typer.Option(False, "--freeze-encoder",
                                            help="Train only the prompt encoder and mask decoder.", rich_help_panel=RECIPE),
        unfreeze_patience: Optional[int] = typer.Option(
            None, "--unfreeze-patience", metavar="EPOCHS", rich_help_panel=RECIPE,
            help="Start with the encoder frozen; each time the epoch loss has not improved for EPOCHS epochs, "
                 "unfreeze one more encoder block (last first) and rebuild the optimizer."),
        epochs: int = typer.Option(100, "--epochs", help="Epochs (one pass over all prepared (case, class) pairs).",
                                   rich_help_panel=RECIPE),
        batch_size: int = typer.Option(1, "--batch-size", help="Samples per micro-batch (per process).",
                                       rich_help_panel=RECIPE),
        accumulate: int = typer.Option(1, "--accumulate", metavar="K",
                                       help="Micro-batches per optimizer step (gradient accumulation).",
                                       rich_help_panel=RECIPE),
        lr: Optional[float] = typer.Option(None, "--lr", help="Encoder learning rate (default 8e-4); prompt encoder "
                                           "and decoder use 0.1×. A resumed run keeps its own.",
                                 rich_help_panel=RECIPE),
        weight_decay: Optional[float] = typer.Option(
            None, "--weight-decay", metavar="WD", rich_help_panel=RECIPE,
            help="AdamW weight decay (default 0.1, the reference). A resumed run keeps its own."),
        lr_milestones: Optional[str] = typer.Option(None, "--lr-milestones", metavar="E1,E2",
                                                    help="Epochs after which the lr is multiplied by 0.1 "
                                                         "(default: 60% and 90% of --epochs).", rich_help_panel=RECIPE),
        iterations: int = typer.Option(11, "--iterations",
                                       help="Decoder iterations (simulated clicks) per sample.", rich_help_panel=RECIPE),
        grad_iterations: Optional[int] = typer.Option(
            None, "--grad-iterations", metavar="K", rich_help_panel=RECIPE,
            help="Fast recipe (RITM-style): a random 0..ITERATIONS-K click rounds without gradients, then K rounds "
                 "with them (default: every round back-propagated, the reference)."),
        centre_clicks: float = typer.Option(
            0.0, "--centre-clicks", metavar="SHARE", rich_help_panel=RECIPE,
            help="Share of simulated clicks placed in the interior of the larger error region (where users click) "
                 "instead of uniformly in the error (default 0, the reference)."),
        decoder_lr_scale: float = typer.Option(
            0.1, "--decoder-lr-scale", metavar="X", rich_help_panel=RECIPE,
            help="Learning rate of the prompt encoder and mask decoder as a multiple of --lr (default 0.1)."),
        prior: str = typer.Option(
            "none", "--prior", metavar="KIND", rich_help_panel=RECIPE,
            help="'classical': the model learns to correct the classical floor's region, computed on its crop "
                 "from the clicks (docs/models.md); 'none' (default): the model predicts the mask alone."),
        prior_scale: float = typer.Option(
            4.0, "--prior-scale", metavar="LOGIT", rich_help_panel=RECIPE,
            help="With --prior: the prior's logit inside (+) and outside (−) its region; the model's correction "
                 "must exceed it to change a voxel (default 4)."),
        prior_loss: str = typer.Option(
            "dice-ce", "--prior-loss", metavar="LOSS", rich_help_panel=RECIPE,
            help="With --prior: 'dice-ce' (default, the reference loss) or 'correction' (pays only for the prior's "
                 "wrong voxels and for right ones made worse, never for sharpening right ones; docs/models.md)."),
        refine_head: bool = typer.Option(
            False, "--refine-head", rich_help_panel=RECIPE,
            help="With --prior classical and --model fastsam3d-tiny-refine: train only the model's refine head, "
                 "a small full-resolution network that corrects the floor on the clicks' box (docs/models.md)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of initial weights, augmentation and clicks "
                                           "(default 2023). A resumed run keeps its own.",
                                 rich_help_panel=RECIPE),
        output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="RUN_DIR",
                                              help="Run folder (default: runs/<model>-<date-time>)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in RUN_DIR exactly from last.pth."),
        device: str = typer.Option("auto", "--device", envvar="FASTSAM3D_DEVICE",
                                   help="auto, cpu, cuda or cuda:N (under torchrun: the process's GPU).",
                                   rich_help_panel=RUN),
        amp: bool = typer.Option(False, "--amp", help="Mixed precision (float16 autocast + grad scaling), CUDA only.",
                                 rich_help_panel=RUN),
        workers: int = typer.Option(0, "--workers", help="Data-loading processes.", rich_help_panel=RUN),
        attention: str = typer.Option("auto", "--attention", help="Encoder attention: auto, exact, sdpa or flash.",
                                      rich_help_panel=RUN),
        max_steps: Optional[int] = typer.Option(None, "--max-steps",
                                                help="Stop after this many optimizer steps in total (resumable).",
                                                rich_help_panel=RUN),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", metavar="MINUTES",
                                                   help="Stop this invocation after MINUTES (resumable).",
                                                   rich_help_panel=RUN),
        save_every: Optional[int] = typer.Option(None, "--save-every", metavar="STEPS",
                                                 help="Also write last.pth every STEPS steps.", rich_help_panel=RUN),
        classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated classes to train on (default all).",
                                              rich_help_panel=DATA),
        min_foreground: int = typer.Option(1000, "--min-foreground", metavar="VOXELS",
                                           help="Redraw crops with fewer label voxels than this.", rich_help_panel=DATA),
        data_mix: Optional[str] = typer.Option(
            None, "--data-mix", metavar="SOURCE=RATIO,...", rich_help_panel=DATA,
            help="Draw each epoch's samples from these sources by ratio: real (prepared pairs, stronger "
                 "augmentation), synth-labels (random-appearance images of --label-maps), shapes (procedural "
                 "scenes), supervoxels (regions of the --label-maps images). Default: the prepared pairs only."),
        label_maps: Optional[List[Path]] = typer.Option(
            None, "--label-maps", metavar="DIR", rich_help_panel=DATA,
            help="nnU-Net training dataset folder for synth-labels and supervoxels (repeat for several)."),
        samples_per_epoch: Optional[int] = typer.Option(
            None, "--samples-per-epoch", metavar="N", rich_help_panel=DATA,
            help="Samples per epoch with --data-mix (default 500)."),
        json_output: bool = typer.Option(False, "--json", help="Print one JSON object with the summary on stdout."),
    ) -> None:
        """Train a model to segment from clicks (SAM-Med3D recipe: simulated clicks, Dice + CE, AdamW, DDP)."""
        from fastsam3d_cli.training.train import train as run_training

        from fastsam3d_cli.data.prepare import parse_class_list

        class_names = parse_class_list(classes)
        with ProgressBars(progress_enabled(json_output)) as bars:
            result = run_training(
                prepared_dirs, model, init=init, freeze_encoder=freeze_encoder, epochs=epochs, batch_size=batch_size,
                accumulate=accumulate, lr=lr, weight_decay=weight_decay, output=output, resume=resume, device=device,
                amp=amp, workers=workers,
                seed=seed, iterations=iterations, unfreeze_patience=unfreeze_patience,
                grad_iterations=grad_iterations, centre_click_share=centre_clicks, decoder_lr_scale=decoder_lr_scale,
                lr_milestones=_int_list(lr_milestones, "--lr-milestones"), max_steps=max_steps,
                time_limit_s=None if time_limit is None else time_limit * 60.0, save_every_steps=save_every,
                classes=class_names, min_foreground_voxels=min_foreground, attention=attention,
                data_mix=data_mix, label_maps=label_maps, samples_per_epoch=samples_per_epoch, prior=prior,
                prior_scale=prior_scale, prior_loss=prior_loss, refine_head=refine_head,
                log=None if state.quiet or json_output else log_to_stderr,
                on_step=lambda record, total: bars.update("steps", record["step"], total, _step_text(record)))
        finish_training_command(result, json_output, _render)


def _step_text(record: dict[str, Any]) -> str:
    return f"epoch {record['epoch']:.2f} loss {_metric(record.get('loss'))} dice {_metric(record.get('dice'))}"


def _metric(value: float | None) -> str:
    """A metric for the table: 0.0 is 0.0000 (not a missing value); only a missing one shows as '-'."""
    return "-" if value is None else f"{value:.4f}"


def _render(result: Any) -> None:  # noqa: ANN401 - TrainResult, imported lazily
    from rich.table import Table

    outcome = result.outcome
    table = Table(title=f"{result.preset}: {result.run_dir}", title_justify="left")
    for column in ("epoch", "step", "loss", "Dice", "lr", "seconds", ""):
        table.add_column(column, justify="right" if column else "left")
    for record in outcome.epoch_records[-10:]:
        lr = record.get("lr") or [0.0]
        table.add_row(str(record["epoch"]), str(record["step"]), _metric(record.get("loss")),
                      _metric(record.get("dice")), f"{max(lr):.2e}", f"{record['seconds']:.0f}",
                      "best" if record.get("best") else "")
    if outcome.epoch_records:
        stdout_console.print(table)
    stdout_console.print(
        f"{outcome.stop_reason}: {outcome.epochs_completed} epoch(s), {outcome.global_step} step(s) on "
        f"{result.samples} sample(s), {result.world_size} process(es), {result.device}, {outcome.wall_s:.0f} s. "
        f"Checkpoints: {outcome.last_checkpoint}"
        + (f", {outcome.best_checkpoint} (best {outcome.best_metric} {outcome.best_value:.4f})"
           if outcome.best_checkpoint and outcome.best_value is not None else ""), highlight=False, markup=False)
