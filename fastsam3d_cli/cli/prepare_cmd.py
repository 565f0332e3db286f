"""`fastsam3d prepare`: nnU-Net v1/v2 raw datasets → per-class binary training data (API: `prepare_datasets`)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fastsam3d_cli.cli.common import (ProgressBars, cli_errors, print_json, progress_enabled, state, stderr_console,
                                      stdout_console)
from fastsam3d_cli.imaging import MODEL_SPACING_MM

EPILOG = (
    "Examples:\n\n"
    "  fastsam3d prepare nnUNet_raw/Dataset501_AbdomenCT -o prepared\n\n"
    "  fastsam3d prepare Dataset501_AbdomenCT Task503_Colin27 -o prepared --classes liver,spleen --workers 2\n\n"
    "  fastsam3d prepare Dataset501_AbdomenCT -o prepared --shard 1/4   (one machine of four; "
    "a plain run afterwards merges the shard manifests)"
)


def register(app: typer.Typer) -> None:
    """Add the `prepare` command to the app."""

    @app.command("prepare", epilog=EPILOG)
    @cli_errors
    def prepare(
        raw_dataset_dirs: List[Path] = typer.Argument(
            ..., metavar="RAW_DATASET_DIR", help="nnU-Net v1 (TaskNNN_*) or v2 (DatasetNNN_*) raw dataset folders."),
        output_dir: Path = typer.Option(
            ..., "--output", "-o", metavar="PREPARED_DIR",
            help="Output folder: <class>/<modality>_<dataset>/{imagesTr,labelsTr}/ + manifest.json."),
        spacing: float = typer.Option(MODEL_SPACING_MM, "--spacing", help="Isotropic output spacing in mm."),
        min_volume_mm3: float = typer.Option(
            10.0, "--min-volume-mm3",
            help="Skip a class in a case when smaller than this (measured before resampling)."),
        classes: Optional[str] = typer.Option(
            None, "--classes", help="Comma-separated class names to prepare (default: all)."),
        channel: Optional[int] = typer.Option(
            None, "--channel", help="Channel (modality) index for multi-channel or 4D datasets, 0-based."),
        workers: int = typer.Option(1, "--workers", help="Cases processed in parallel (processes)."),
        shard: Optional[str] = typer.Option(
            None, "--shard", metavar="K/N",
            help="Prepare only shard K of N (1-based) of all cases; for several machines."),
        resample_labels: bool = typer.Option(False, "--resample-labels",
                                             help="Resample a label whose grid differs from its image onto the image "
                                                  "(by physical position, nearest) instead of stopping."),
        shared_grid: bool = typer.Option(False, "--shared-grid",
                                         help="Keep every class of a case on one grid. By default a class whose "
                                              "volume that grid changes by more than 1% (small, thin regions) is "
                                              "written on the nearby grid placement that keeps it best; labels "
                                              "stay nearest-neighbour either way."),
        json_output: bool = typer.Option(False, "--json", help="Print one JSON object with the summary on stdout."),
    ) -> None:
        """Prepare nnU-Net v1/v2 datasets as per-class binary training data at 1.5 mm (SAM-Med3D layout)."""
        from fastsam3d_cli.data.prepare import parse_class_list, parse_shard, prepare_datasets

        shard_parts = parse_shard(shard)
        with ProgressBars(progress_enabled(json_output)) as bars:
            def report(done: int, total: int, what: str) -> None:
                bars.update("cases", done, total, f"preparing cases (done: {what})" if what else "preparing cases")

            result = prepare_datasets(raw_dataset_dirs, output_dir, spacing_mm=spacing, min_volume_mm3=min_volume_mm3,
                                      classes=parse_class_list(classes), channel=channel, workers=workers,
                                      shard=shard_parts, resample_labels=resample_labels, shared_grid=shared_grid,
                                      progress=report)
        if not state.quiet:
            for warning in result.warnings:
                stderr_console.print(f"warning: {warning}", markup=False, highlight=False)
        if json_output:
            print_json(result.to_json())
        else:
            _render(result)


def _render(result) -> None:  # noqa: ANN001 - PrepareResult, imported lazily
    from rich.table import Table

    table = Table(title=f"Prepared at {result.spacing_mm:g} mm → {result.output_dir}", title_justify="left")
    table.add_column("class", no_wrap=True)
    for column in ("written", "too small", "absent", "total mL"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("datasets", overflow="fold")
    for summary in result.classes:
        table.add_row(summary.name, str(summary.written), str(summary.skipped), str(summary.absent),
                      f"{summary.total_ml:.2f}", ", ".join(summary.datasets))
    stdout_console.print(table)
    shard = f" (shard {result.shard[0]}/{result.shard[1]})" if result.shard else ""
    stdout_console.print(
        f"{result.cases_total} case(s){shard}: {result.cases_prepared} prepared, {result.cases_already_complete} "
        f"already complete, in {result.wall_s:.1f} s. Manifest: {result.manifest_path}", highlight=False, markup=False)
    if result.small_skips:
        shown = "; ".join(f"{s['dataset']}/{s['case']}/{s['class']} ({s['source_mm3']:g} mm³)"
                          for s in result.small_skips[:10])
        more = f"; and {len(result.small_skips) - 10} more" if len(result.small_skips) > 10 else ""
        stdout_console.print(f"Skipped as too small or empty after resampling: {shown}{more} (reasons in the manifest)",
                             highlight=False, markup=False)
