"""`fastsam3d validate`: Dice/IoU per simulated click on prepared data (API: `fastsam3d_cli.validate.validate`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, List, Optional

import typer

from fastsam3d_cli.cli.common import (ProgressBars, cli_errors, print_json, progress_enabled, state, stderr_console,
                                      stdout_console)

EPILOG = (
    "Examples:\n\n"
    "  fastsam3d validate prepared --checkpoint runs/tiny/best.pth\n\n"
    "  fastsam3d validate prepared --checkpoint FastSAM3D.pth --model fastsam3d --clicks 10 --plot dice.png "
    "--csv cases.csv\n\n"
    "  fastsam3d validate prepared --checkpoint runs/tiny/last.pth --json > scores.json\n\n"
    "Clicks are simulated from the label (ritm for clicks 1-2, random after, seeded per case) on the 128³ crop "
    "centred on it. 'best' = mean over (case, class) of the best Dice over the clicks (the papers' summary).\n\n"
    "Exit codes: 0 ok, 2 usage, 3 bad input (dataset, output location), 4 weights, 5 device."
)
ADVANCED = "Model and device"
OUTPUTS = "Outputs"


def register(app: typer.Typer) -> None:
    """Add the `validate` command to the app."""

    @app.command("validate", epilog=EPILOG)
    @cli_errors
    def validate(
        prepared_dirs: List[Path] = typer.Argument(..., metavar="PREPARED_DIR",
                                                   help="Folder(s) written by `fastsam3d prepare`."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", metavar="CKPT",
                                                  help="Checkpoint to validate (required unless --model bundled)."),
        model: Optional[str] = typer.Option(None, "--model", "-m",
                                            help="sam-med3d, fastsam3d, fastsam3d-tiny or fastsam3d-tiny-refine (default: from "
                                                 "the checkpoint); "
                                                 "bundled: validate the model shipped in the package.",
                                            rich_help_panel=ADVANCED),
        clicks: int = typer.Option(10, "--clicks", help="Simulated clicks per (case, class)."),
        seed: int = typer.Option(2023, "--seed", help="Seed of the simulated clicks."),
        classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated classes (default all)."),
        device: str = typer.Option("auto", "--device", envvar="FASTSAM3D_DEVICE", help="auto, cpu, cuda or cuda:N.",
                                   rich_help_panel=ADVANCED),
        attention: str = typer.Option("auto", "--attention", help="Encoder attention: auto, exact, sdpa or flash.",
                                      rich_help_panel=ADVANCED),
        plot: Optional[Path] = typer.Option(None, "--plot", metavar="PNG", help="Write Dice vs number of clicks.",
                                            rich_help_panel=OUTPUTS),
        csv_path: Optional[Path] = typer.Option(None, "--csv", metavar="CSV",
                                                help="Write per-(case, class) Dice and IoU after every click.",
                                                rich_help_panel=OUTPUTS),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs.", rich_help_panel=OUTPUTS),
        json_output: bool = typer.Option(False, "--json", help="Print one JSON object with every score on stdout."),
    ) -> None:
        """Score a checkpoint: Dice and IoU after each simulated click, per class and overall."""
        from fastsam3d_cli.training.validate import validate as run_validation

        from fastsam3d_cli.data.prepare import parse_class_list

        from fastsam3d_cli.errors import UsageError
        from fastsam3d_cli.weights.loading import bundled_file

        class_names = parse_class_list(classes)
        shipped = bundled_file(model)
        if shipped is not None and checkpoint is not None:
            raise UsageError(f"--model {model} is the bundled model's file, so --checkpoint has nothing to do",
                             "drop one of them")
        if shipped is None and checkpoint is None:
            raise UsageError("no checkpoint to validate", "give --checkpoint PATH, or --model bundled")
        checkpoint, model = (shipped, None) if shipped is not None else (checkpoint, model)
        with ProgressBars(progress_enabled(json_output)) as bars:
            result = run_validation(prepared_dirs, checkpoint, model, clicks=clicks, seed=seed, device=device,
                                    attention=attention, classes=class_names, csv_path=csv_path, plot_path=plot,
                                    overwrite=overwrite,
                                    progress=lambda done, total, what: bars.update("pairs", done, total,
                                                                                   f"validated {what}"))
        if json_output:
            print_json(result.to_json())
            return
        if not state.quiet:
            for message in result.skipped:
                stderr_console.print(f"warning: {message}", markup=False, highlight=False)
        _render(result)


def _fmt(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.4f}"


def _render(result: Any) -> None:  # noqa: ANN401 - ValidationResult, imported lazily
    from rich.table import Table

    ks = result.reported_clicks
    table = Table(title=f"{result.preset} ({result.checkpoint}) on {result.device}: Dice after k clicks",
                  title_justify="left")
    table.add_column("class")
    table.add_column("pairs", justify="right")
    for k in ks:
        table.add_column(f"Dice@{k}", justify="right")
    table.add_column("best", justify="right")
    for name, summary in result.per_class().items():
        table.add_row(name, str(summary["cases"]), *[_fmt(summary["dice_at"][str(k)]) for k in ks],
                      _fmt(summary["mean_best_dice"]))
    overall = result.overall()
    table.add_section()
    table.add_row("overall", str(overall["cases"]), *[_fmt(overall["dice_at"][str(k)]) for k in ks],
                  _fmt(overall["mean_best_dice"]), style="bold")
    stdout_console.print(table)
    written = [str(p) for p in (result.csv_path, result.plot_path) if p is not None]
    tail = f"; wrote {', '.join(written)}" if written else ""
    stdout_console.print(f"{overall['cases']} (case, class) pair(s), {result.clicks} click(s) each, "
                         f"{result.wall_s:.1f} s{tail}", highlight=False, markup=False)
