"""`fastsam3d distill`: layer-wise progressive distillation of a teacher encoder into a student
(API: `fastsam3d_cli.distill.distill`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from fastsam3d_cli.cli.common import (ProgressBars, cli_errors, finish_training_command, log_to_stderr,
                                      progress_enabled, state, stdout_console)

EPILOG = (
    "Examples:\n\n"
    "  fastsam3d distill prepared --teacher sam_med3d_turbo.pth --student fastsam3d-tiny -o runs/distill\n\n"
    "  fastsam3d distill prepared --teacher teacher.pth --student fastsam3d --cache-features /scratch/feats "
    "--epochs-per-stage 12\n\n"
    "  fastsam3d distill prepared --teacher teacher.pth --student fastsam3d-tiny -o runs/distill --resume\n\n"
    "  then fine-tune the decoder on the student's features:\n"
    "  fastsam3d train prepared --model fastsam3d-tiny --init runs/distill/student.pth --freeze-encoder "
    "--unfreeze-patience 3\n\n"
    "Stage k = 1..S matches student block k to teacher block k·(T/S) (MSE), stage S+1 the necks; each stage lasts "
    "--epochs-per-stage epochs. Writes RUN_DIR/student.pth (student encoder + the teacher's prompt encoder and "
    "decoder; loadable by infer, validate and benchmark), last.pth (resume), metrics.jsonl (per epoch, with the "
    "stage), stages.jsonl (per stage: MSE before/after), steps.jsonl, train.png, and the teacher feature cache "
    "(RUN_DIR/teacher_features unless --cache-features).\n\n"
    "Exit codes: 0 ok, 2 usage, 3 bad input (dataset, run folder, a feature cache of another teacher, crop size "
    "or sample set, full disk), 4 weights (teacher or student checkpoint of the wrong model), 5 device, "
    "130 interrupted."
)
RECIPE = "Recipe"
RUN = "Run control"
DATA = "Data"
STUDENTS = ("fastsam3d", "fastsam3d-tiny")


def register(app: typer.Typer) -> None:
    """Add the `distill` command to the app."""

    @app.command("distill", epilog=EPILOG)
    @cli_errors
    def distill(
        prepared_dirs: List[Path] = typer.Argument(..., metavar="PREPARED_DIR",
                                                   help="Folders written by `fastsam3d prepare`."),
        teacher: Path = typer.Option(..., "--teacher", metavar="CKPT", help="Teacher checkpoint (full model)."),
        teacher_model: str = typer.Option("sam-med3d", "--teacher-model",
                                          help="The teacher's model: sam-med3d, fastsam3d, fastsam3d-tiny, or auto "
                                               "(from the checkpoint)."),
        student: str = typer.Option(..., "--student", "-s", help="Student model: fastsam3d or fastsam3d-tiny."),
        student_init: Optional[Path] = typer.Option(None, "--student-init", metavar="CKPT", rich_help_panel=RECIPE,
                                                    help="Start the student encoder from this checkpoint "
                                                         "(full or encoder-only; must fit --student)."),
        cache_features: Optional[Path] = typer.Option(None, "--cache-features", metavar="DIR", rich_help_panel=DATA,
                                                      help="Teacher feature cache folder (reused and resumed when "
                                                           "it matches; default RUN_DIR/teacher_features)."),
        cache_dtype: str = typer.Option("float16", "--cache-dtype", rich_help_panel=DATA,
                                        help="float16 (half the disk) or float32."),
        epochs_per_stage: int = typer.Option(3, "--epochs-per-stage", rich_help_panel=RECIPE,
                                             help="Epochs per stage (S block stages + 1 neck stage)."),
        init_from_teacher: Optional[bool] = typer.Option(
            None, "--init-from-teacher/--no-init-from-teacher", rich_help_panel=RECIPE,
            help="Copy the teacher's patch/position embedding and neck into the student where shapes match (all "
                 "for fastsam3d, the neck tail for fastsam3d-tiny). Default: on, off with --student-init."),
        freeze_copied: bool = typer.Option(False, "--freeze-copied", rich_help_panel=RECIPE,
                                           help="Do not train the tensors copied from the teacher."),
        lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (default 8e-4). A resumed run "
                                           "keeps its own.", rich_help_panel=RECIPE),
        batch_size: int = typer.Option(1, "--batch-size", help="Samples per micro-batch (per process).",
                                       rich_help_panel=RECIPE),
        accumulate: int = typer.Option(1, "--accumulate", metavar="K",
                                       help="Micro-batches per optimizer step.", rich_help_panel=RECIPE),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the student's initial weights and the sample "
                                           "order (default 2023). A resumed run keeps its own.",
                                 rich_help_panel=RECIPE),
        output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="RUN_DIR",
                                              help="Run folder (default: runs/distill-<student>-<date-time>)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in RUN_DIR exactly from last.pth."),
        device: str = typer.Option("auto", "--device", envvar="FASTSAM3D_DEVICE",
                                   help="auto, cpu, cuda or cuda:N (under torchrun: the process's GPU).",
                                   rich_help_panel=RUN),
        amp: bool = typer.Option(False, "--amp", help="Mixed precision training, CUDA only.", rich_help_panel=RUN),
        workers: int = typer.Option(0, "--workers", help="Data-loading processes.", rich_help_panel=RUN),
        attention: str = typer.Option("auto", "--attention", help="Attention backend: auto, exact, sdpa or flash.",
                                      rich_help_panel=RUN),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", rich_help_panel=RUN,
                                                help="Stop after this many optimizer steps in total (resumable)."),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", metavar="MINUTES", rich_help_panel=RUN,
                                                   help="Stop this invocation after MINUTES (resumable)."),
        save_every: Optional[int] = typer.Option(None, "--save-every", metavar="STEPS", rich_help_panel=RUN,
                                                 help="Also write last.pth every STEPS steps."),
        classes: Optional[str] = typer.Option(None, "--classes", rich_help_panel=DATA,
                                              help="Comma-separated classes to use (default all)."),
        max_samples: Optional[int] = typer.Option(None, "--max-samples", rich_help_panel=DATA,
                                                  help="Use only the first N (class, case) samples."),
        json_output: bool = typer.Option(False, "--json", help="Print one JSON object with the summary on stdout."),
    ) -> None:
        """Distil a teacher's image encoder into a student, stage by stage (FastSAM3D's layer-wise recipe)."""
        from fastsam3d_cli.training.distill import distill as run_distillation
        from fastsam3d_cli.errors import UsageError

        if student not in STUDENTS:
            raise UsageError(f"--student '{student}' is not a student model", f"choose one of: {', '.join(STUDENTS)}")
        if cache_dtype not in ("float16", "float32"):
            raise UsageError(f"--cache-dtype '{cache_dtype}' is not supported", "choose float16 or float32")
        from fastsam3d_cli.data.prepare import parse_class_list

        class_names = parse_class_list(classes)
        with ProgressBars(progress_enabled(json_output)) as bars:
            result = run_distillation(
                prepared_dirs, teacher, student=student, teacher_model=None if teacher_model == "auto" else teacher_model,
                student_init=student_init, cache_features=cache_features, cache_dtype=cache_dtype,
                epochs_per_stage=epochs_per_stage, output=output, resume=resume, init_from_teacher=init_from_teacher,
                freeze_copied=freeze_copied, lr=lr, batch_size=batch_size, accumulate=accumulate, workers=workers,
                seed=seed, device=device, attention=attention, amp=amp, classes=class_names, max_samples=max_samples,
                max_steps=max_steps, time_limit_s=None if time_limit is None else time_limit * 60.0,
                save_every_steps=save_every, log=None if state.quiet or json_output else log_to_stderr,
                on_cache=lambda done, total: bars.update("cache", done, total, "teacher features"),
                on_step=lambda record, total: bars.update("train", int(record["step"]), total, _step_text(record)))
        finish_training_command(result, json_output, _render)


def _step_text(record: dict[str, Any]) -> str:
    return f"stage {int(record.get('stage', 0))} · epoch {record['epoch']:.2f} · loss {record['loss']:.4g}"


def _fmt(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4g}"


def _render(result: Any) -> None:  # noqa: ANN401 - DistillResult, imported lazily
    from rich.table import Table

    table = Table(title=f"{result.teacher['name']} → {result.student}: {result.run_dir}", title_justify="left")
    for column in ("stage", "student ↔ teacher", "epochs", "MSE before", "MSE after"):
        table.add_column(column, justify="left" if "↔" in column else "right", no_wrap=True)
    for s in result.stages:
        pair = s["pair"].replace("student ", "").replace("teacher ", "")
        table.add_row(str(s["stage"]), pair, str(s["epochs_done"]), _fmt(s["start_mse"]), _fmt(s["end_mse"]))
    stdout_console.print(table)
    outcome = result.outcome
    stdout_console.print(
        f"{outcome.stop_reason}: {outcome.epochs_completed} epoch(s), {outcome.global_step} step(s) on {result.samples} "
        f"sample(s), {result.world_size} process(es), {result.device}, {outcome.wall_s:.0f} s. "
        f"Neck MSE to the teacher: {_fmt(result.neck_mse_init)} at start → {_fmt(result.neck_mse_final)}. "
        f"Feature cache: {result.cache_dir} ({result.cache_bytes / 1e6:.1f} MB, {result.cache_dtype}).",
        highlight=False, markup=False)
    if result.student_checkpoint:
        stdout_console.print(f"Student checkpoint: {result.student_checkpoint}", highlight=False, markup=False)
    else:
        stdout_console.print(f"Not finished yet: continue with --resume (checkpoint {outcome.last_checkpoint}).",
                             highlight=False, markup=False)
