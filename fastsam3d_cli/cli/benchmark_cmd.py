"""`fastsam3d benchmark`: ms per 128³ volume, FLOPs and peak memory for models × attention backends × dtypes.

Parses options, calls `fastsam3d_cli.benchmark.speed.run_benchmark`, renders Rich tables (or one JSON object).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fastsam3d_cli.cli.common import cli_errors, print_json, progress_enabled, stderr_console, stdout_console

ADVANCED = "Advanced"
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def register(app: typer.Typer) -> None:
    app.command("benchmark")(benchmark_command)


@cli_errors
def benchmark_command(
    model: Optional[List[str]] = typer.Option(
        None, "--model", "-m", metavar="NAME",
        help="Model preset, repeatable: sam-med3d, fastsam3d, fastsam3d-tiny; bundled times the model shipped "
             "in the package (as a --checkpoint; it has no encoder pass, so its row times the per-click prior "
             "step instead). Default: fastsam3d. "
             "Speed-ups are relative to the first model × attention × dtype listed."),
    checkpoint: Optional[List[Path]] = typer.Option(
        None, "--checkpoint", metavar="PATH",
        help="Also time this weights file (repeatable; its preset is read from the file), e.g. a distilled "
             "student.pth. With --checkpoint and no --model only the checkpoints are timed."),
    attention: Optional[List[str]] = typer.Option(
        None, "--attention", "-a", metavar="BACKEND",
        help="Attention backend, repeatable: auto, exact, sdpa, flash, sparse. Default: auto. "
             "A backend the device cannot run gives an 'unavailable' row; the run goes on."),
    device: str = typer.Option("auto", "--device", envvar="FASTSAM3D_DEVICE",
                               help="auto, cpu, cuda or cuda:N (auto = CUDA when present)."),
    dtype: Optional[List[str]] = typer.Option(
        None, "--dtype", metavar="DTYPE", help="float32, bfloat16 or float16, repeatable. Default: float32."),
    batch: int = typer.Option(1, "--batch", help="Volumes per encoder call (all timings are per call)."),
    repeats: int = typer.Option(20, "--repeats", help="Timed interactions per configuration (median, p5, p95)."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed interactions after the first call."),
    clicks: int = typer.Option(5, "--clicks", help="Decoder steps per interaction (one new click each)."),
    volume: Optional[str] = typer.Option(None, "--volume", metavar="FILE",
                                         help="Also time file → file inference of this volume (or DICOM folder / "
                                              ".zip), stage by stage."),
    series: Optional[str] = typer.Option(None, "--series", metavar="UID",
                                         help="SeriesInstanceUID of the DICOM series to read when --volume holds "
                                              "several."),
    clicks_file: Optional[str] = typer.Option(None, "--clicks-file", metavar="FILE",
                                              help="Click file for --volume."),
    json_output: bool = typer.Option(False, "--json", help="Print everything as one JSON object on stdout."),
    budget: float = typer.Option(
        60.0, "--budget", metavar="SECONDS", rich_help_panel=ADVANCED,
        help="Time one configuration may take; its warm-up and repeats are reduced to fit (never below 1 warm-up "
             "and 3 repeats). 0 = no cap."),
    threads: Optional[int] = typer.Option(None, "--threads", rich_help_panel=ADVANCED,
                                          help="torch CPU threads (default: torch's choice, reported)."),
    no_flops: bool = typer.Option(False, "--no-flops", rich_help_panel=ADVANCED,
                                  help="Skip counting FLOPs and parameters."),
) -> None:
    """Time the encoder, each decoder step and a whole interaction per 128³ volume; count FLOPs; peak memory.

    GPU timings use CUDA events with synchronisation; the first call (lazy init) is reported separately and
    warm-up is excluded. Example: fastsam3d benchmark -m sam-med3d -m fastsam3d -a sdpa --dtype bfloat16
    """
    from fastsam3d_cli.benchmark.speed import run_benchmark
    from fastsam3d_cli.weights.loading import bundled_file

    show_progress = progress_enabled(json_output)
    named = [(name, bundled_file(name)) for name in model or []]  # `-m bundled`: the shipped file, timed as a checkpoint
    model = [name for name, path in named if path is None]
    checkpoint = [*(checkpoint or []), *(path for _, path in named if path is not None)]
    result = run_benchmark(
        models=model or ([] if checkpoint else ["fastsam3d"]), checkpoints=checkpoint or [],
        attentions=attention or ["auto"], device=device, dtypes=dtype or ["float32"],
        batch=batch, repeats=repeats, warmup=warmup, clicks=clicks, budget_s=budget, threads=threads,
        volume=volume, clicks_file=clicks_file, count_flops=not no_flops, series=series,
        progress=(lambda text: stderr_console.print(text, highlight=False, markup=False)) if show_progress else None)
    if json_output:
        print_json(result.to_dict())
        return
    _render(result)
    for warning in result.warnings:
        stderr_console.print(f"fastsam3d: warning: {warning}", highlight=False, markup=False)


# ----------------------------------------------------------------------------------------- rendering
def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _stats_cell(stats) -> str:
    if stats is None:
        return "— (none)"
    return f"{_ms(stats.median_ms)} [{_ms(stats.p5_ms)}–{_ms(stats.p95_ms)}]"


def _speed_cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}×"


def _config_cell(row) -> str:
    attention = row.attention if row.backend in (None, row.attention) else f"{row.attention}→{row.backend}"
    model = f"{Path(row.checkpoint).name} ({row.model})" if row.checkpoint else row.model
    return f"{model} {attention} {SHORT_DTYPES.get(row.dtype, row.dtype)}"


def _render(result) -> None:
    from rich.table import Table
    from rich.text import Text

    from fastsam3d_cli.benchmark.speed import PRIOR_STEP

    env, settings = result.environment, result.settings
    threads = f"{env['torch_threads']} torch thread(s) of {env['cpu_cores_available']} core(s)"
    if env["device"] == "cpu":
        threads += f", GEMMs on {env.get('cpu_gemm', 'aten')}"
    stdout_console.print(
        f"{env['date_utc']}  {env['device']} ({env['device_name']})  torch {env['torch']}  CUDA {env['cuda'] or '-'}  "
        f"flash-attn {env['flash_attn'] or 'not installed'}  {threads}  load {env['load_average_1m']:.2f}",
        highlight=False, markup=False)
    clicks = settings["clicks"]
    title = Text(f"ms per call (batch {settings['batch']}), median [p5–p95]; n = timed repeats (* = cut by --budget)")
    caption = Text(f"× = times faster than {result.baseline} (encoder; encode + {clicks} click(s))")
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("configuration")
    for column in ("encoder", "decoder step", f"encode + {clicks} click(s)", "1st call", "n", "peak MiB",
                   "× enc", "× total"):
        table.add_column(column, justify="right")
    problems = []
    for row in result.configs:
        if row.status != "ok":
            problems.append(f"{row.label} {row.status}: {row.reason}")
            table.add_row(_config_cell(row), row.status, *["-"] * 7)
            continue
        peak = "-" if row.peak_memory_mb is None else f"{row.peak_memory_mb:.0f}"
        first = row.first_call["encoder_ms"] if row.step == "decoder" else row.first_call["decoder_step_ms"]
        table.add_row(_config_cell(row), Text(_stats_cell(row.encoder)), Text(_stats_cell(row.decoder_step)),
                      Text(_stats_cell(row.interactive)), _ms(first),
                      f"{row.repeats_done}{'*' if row.capped_by_budget else ''}", peak,
                      _speed_cell(row.speedup["encoder"]), _speed_cell(row.speedup["interactive"]))
    stdout_console.print(table)
    prior_rows = [row for row in result.configs if row.status == "ok" and row.step == "prior"]
    if prior_rows:
        boxes = ", ".join(f"{row.label}: {'×'.join(map(str, row.prior_box or []))}" for row in prior_rows)
        stdout_console.print(f"prior step: {PRIOR_STEP}; 1st call = its first step; refine-head box at the last "
                             f"click: {boxes} voxels; no FLOP count (it counts the encoder)",
                             highlight=False, markup=False, soft_wrap=True)
    for line in problems:
        stdout_console.print(line, highlight=False, markup=False)
    _render_end_to_end(result)
    _render_flops(result)


def _render_end_to_end(result) -> None:
    from rich.table import Table
    from rich.text import Text

    rows = [row for row in result.configs if row.end_to_end]
    if not rows:
        return
    stages = list(rows[0].end_to_end)
    table = Table(title=Text(f"file → file ms, median [p5–p95], for {result.settings['volume']}"),
                  title_justify="left")
    table.add_column("configuration")
    table.add_column("crops", justify="right")
    for stage in stages:
        table.add_column(stage, justify="right")
    for row in rows:
        table.add_row(row.label, str(row.end_to_end_crops if row.end_to_end_crops is not None else "-"),
                      *[Text(_stats_cell(row.end_to_end[s])) if s in row.end_to_end else "-" for s in stages])
    stdout_console.print(table)
    if len({row.end_to_end_crops for row in rows}) > 1:
        stdout_console.print("crops = 128³ crops encoded per run: a mask that reaches a crop face grows another "
                             "crop, so it depends on the weights; totals with different crop counts are not "
                             "compared (no end_to_end speed-up)", highlight=False, markup=False)


def _render_flops(result) -> None:
    from rich.table import Table

    seen: dict[tuple[str, str], dict] = {}
    for row in result.configs:
        if row.flops is not None:
            seen.setdefault((row.model, row.flops["counted_backend"]), row.flops)
    if not seen:
        return
    table = Table(title="per 128³ volume: GMACs (1 MAC = 1 multiply-add = 2 FLOPs) and parameters",
                  title_justify="left",
                  caption="thop-style = Linear/Conv only (addmm + convolution), what the paper's thop numbers count; "
                          "the full count adds attention matmuls and relative-position einsums",
                  caption_justify="left")
    for column in ("model", "arithmetic", "encoder GMAC", "thop-style", "decoder step GMAC", "encoder params",
                   "prompt enc + decoder params"):
        table.add_column(column, justify="left" if column in ("model", "arithmetic") else "right", no_wrap=True)
    for (model, backend), flops in seen.items():
        encoder = flops["image_encoder"]
        thop_style = sum(v for op, v in encoder["by_op_gmacs"].items() if op in ("addmm", "mm", "convolution"))
        params = flops["params"]
        table.add_row(model, backend, f"{encoder['gmacs']:.1f}", f"{thop_style:.1f}",
                      f"{flops['decoder_step']['gmacs']:.2f}", f"{params['image_encoder'] / 1e6:.2f} M",
                      f"{(params['prompt_encoder'] + params['mask_decoder']) / 1e6:.2f} M")
    stdout_console.print(table)
