"""`fastsam3d infer`: segment a volume from a click file, on the volume's own grid (API: `infer_file`)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from fastsam3d_cli.cli.common import cli_errors, print_error, print_json, progress_enabled, state, stdout_console
from fastsam3d_cli.errors import ExitCode, UsageError

EPILOG = (
    "Examples:\n\n"
    "  fastsam3d infer ct.nii.gz --clicks clicks.json                      (writes ct_mask.nii.gz + ct_mask.json)\n\n"
    "  fastsam3d infer ct.nii.gz --clicks liver.mrk.json -o liver.nii.gz --preview liver.png\n\n"
    "  fastsam3d infer ct.nii.gz --clicks clicks.json --checkpoint student.pth --device cpu --json\n\n"
    "  fastsam3d infer --batch cases.csv          (CSV columns volume,clicks[,output]; the model is loaded once)\n\n"
    "Click file: {\"space\": \"ras\", \"objects\": [{\"name\": \"liver\", \"label\": 1, "
    "\"points\": [[-42.0, 18.5, 101.0]], \"point_labels\": [1]}]} — space ijk (NIfTI axis order), ras or lps.\n\n"
    "Exit codes: 0 ok, 2 usage, 3 bad input (volume, click file, output location), 4 weights, 5 device, "
    "130 interrupted."
)
ADVANCED = "Model and device"
OUTPUTS = "Outputs"


def register(app: typer.Typer) -> None:
    """Add the `infer` command to the app."""

    @app.command("infer", epilog=EPILOG)
    @cli_errors
    def infer(
        volume: Optional[Path] = typer.Argument(None, metavar="VOLUME", help="3D volume: NIfTI (.nii/.nii.gz), NRRD or MHA, or a "
                                                                  "DICOM series (a folder or .zip of its files). "
                                                                  "Required unless --batch."),
        clicks: Optional[Path] = typer.Option(None, "--clicks", "-c", metavar="CLICKS_JSON",
                                    help="Click file (fastsam3d JSON with space ijk|ras|lps, or a 3D Slicer .mrk.json). "
                                             "Required unless --batch."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="MASK",
                                              help="Labelmap to write (default: <input stem>_mask.nii.gz beside the "
                                                   "input). The sidecar <MASK stem>.json is written beside it.",
                                              rich_help_panel=OUTPUTS),
        model: Optional[str] = typer.Option(None, "--model", "-m",
                                            help="fastsam3d, sam-med3d, fastsam3d-tiny or bundled (the small model "
                                                 "shipped in the package). Without --checkpoint the named weights "
                                                 "come from the cache (`fastsam3d weights download NAME`). Default: "
                                                 "the published fastsam3d; when it cannot be fetched (offline) the "
                                                 "bundled model, with a note on stderr.", rich_help_panel=ADVANCED),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", metavar="PATH",
                                                  help="Checkpoint file; its model is inferred unless --model is given.",
                                                  rich_help_panel=ADVANCED),
        device: str = typer.Option("auto", "--device", envvar="FASTSAM3D_DEVICE",
                                   help="auto, cpu, cuda or cuda:N.", rich_help_panel=ADVANCED),
        attention: str = typer.Option("auto", "--attention",
                                      help="Encoder attention: auto, exact, sdpa, flash or sparse.",
                                      rich_help_panel=ADVANCED),
        dtype: str = typer.Option("float32", "--dtype",
                                  help="float32 (exact), bfloat16 or float16 (faster on CPUs with AVX512-BF16 and on "
                                       "GPUs; outlines can differ by a voxel).", rich_help_panel=ADVANCED),
        max_crops: int = typer.Option(8, "--max-crops", min=1,
                                      help="128³ crops per object; more are added where the mask reaches a crop "
                                           "border (1 turns extension off).", rich_help_panel=ADVANCED),
        channel: Optional[int] = typer.Option(None, "--channel", min=0,
                                              help="Channel of a 4D / multi-channel volume (0-based)."),
        offline: bool = typer.Option(False, "--offline", envvar="FASTSAM3D_OFFLINE",
                                     help="Never download weights (without --model: run the bundled model "
                                          "unless the published one is cached).", rich_help_panel=ADVANCED),
        preview: Optional[Path] = typer.Option(None, "--preview", metavar="PNG",
                                               help="Also write a PNG: 3 slices through each object with its "
                                                    "outline and clicks.", rich_help_panel=OUTPUTS),
        probabilities: Optional[Path] = typer.Option(None, "--probabilities", metavar="DIR",
                                                     help="Also write per-object float32 probability maps "
                                                          "(NIfTI, input grid) into DIR.", rich_help_panel=OUTPUTS),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs.",
                                       rich_help_panel=OUTPUTS),
        json_output: bool = typer.Option(False, "--json", help="Print the sidecar as one JSON object on stdout."),
        batch: Optional[Path] = typer.Option(None, "--batch", metavar="MANIFEST_CSV",
                                             help="Segment every volume of a CSV manifest (columns volume, clicks "
                                                  "and optionally output) with the model loaded once, instead of "
                                                  "VOLUME --clicks. The whole manifest is checked before anything "
                                                  "runs; a line that fails while running is reported and the "
                                                  "others still run."),
        series: Optional[str] = typer.Option(None, "--series", metavar="UID",
                                             help="SeriesInstanceUID of the DICOM series to read when the folder "
                                                  "holds several."),
        output_format: Optional[str] = typer.Option(None, "--format", metavar="FORMAT",
                                                    help="labelmap (default) or dicom-seg: also write <MASK stem>.dcm, "
                                                         "a DICOM-SEG referencing the input series (DICOM input only; "
                                                         "-o mask.dcm does the same).", rich_help_panel=OUTPUTS),
        mesh: Optional[Path] = typer.Option(None, "--mesh", metavar="DIR",
                                            help="Also write one STL surface per object (LPS mm) into DIR.",
                                            rich_help_panel=OUTPUTS),
        mesh_format: str = typer.Option("stl", "--mesh-format", metavar="FORMAT",
                                        help="stl (binary, default) or obj: the file format of --mesh.",
                                        rich_help_panel=OUTPUTS),
    ) -> None:
        """Segment the objects of a click file; write a labelmap on the volume's own grid and a JSON sidecar."""
        from fastsam3d_cli.weights.loading import start_hashing_weights

        start_hashing_weights(model, checkpoint)  # the weights' sha256 check runs while torch imports

        from fastsam3d_cli.imaging import preload_nibabel
        from fastsam3d_cli.interactive.infer import infer_file

        preload_nibabel()  # before anything imports it: without pydicom (a cold-start cost)

        report = _stage_reporter(progress_enabled(json_output))
        if batch is not None:
            single = {"VOLUME": volume, "--clicks": clicks, "--output": output, "--preview": preview,
                      "--probabilities": probabilities, "--series": series, "--format": output_format, "--mesh": mesh}
            _run_batch(batch, [name for name, value in single.items() if value is not None], json_output, report,
                       model=model, checkpoint=checkpoint, device=device, attention=attention, overwrite=overwrite,
                       max_crops=max_crops, channel=channel, offline=offline or None, dtype=dtype)
            return
        if volume is None:  # required without --batch; the same words as Click's own check
            raise UsageError("Missing argument 'VOLUME'", "see 'fastsam3d infer --help'")
        if clicks is None:
            raise UsageError("Missing option '--clicks' / '-c'", "see 'fastsam3d infer --help'")
        result = infer_file(volume, clicks, output, model=model, checkpoint=checkpoint, device=device,
                            attention=attention, preview=preview, probabilities=probabilities, overwrite=overwrite,
                            max_crops=max_crops, channel=channel, offline=offline or None, progress=report,
                            dtype=dtype, series=series, output_format=output_format, mesh=mesh,
                            mesh_format=mesh_format)
        if json_output:
            print_json(result)
        elif not state.quiet:
            _render(result)


def _stage_reporter(enabled: bool) -> Any:
    """Stage names on stderr (only for a human at a terminal)."""
    if not enabled:
        return None

    def report(stage: str) -> None:
        sys.stderr.write(f"fastsam3d infer: {stage}…\n")
        sys.stderr.flush()

    return report


def _render(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{result['model']['preset']} on {result['device']} ({result['attention']})",
                  title_justify="left")
    for column, justify in (("object", "left"), ("label", "right"), ("voxels", "right"), ("mL", "right"),
                            ("clicks", "right"), ("crops", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for obj in result["objects"]:
        table.add_row(obj["name"], str(obj["label"]), str(obj["voxels"]), f"{obj['volume_ml']:.2f}",
                      str(len(obj["clicks"])), str(obj["crops_run"]))
    stdout_console.print(table)
    t = result["timings_ms"]
    stdout_console.print(
        f"time {t['after_model_load'] / 1000:.2f} s after a {t['load_model'] / 1000:.2f} s model load: read "
        f"{t['read']:.0f} ms, preprocess {t['preprocess']:.0f}, encode {t['encode']:.0f}, decode {t['decode']:.0f}, "
        f"paste {t['paste']:.0f}, write {t['write']:.0f}", highlight=False, markup=False)
    outputs = result["outputs"]
    written = [outputs["labelmap"], outputs["sidecar"]] + ([outputs["preview"]] if outputs["preview"] else []) \
        + list((outputs["probabilities"] or {}).values()) + ([outputs["dicom_seg"]] if outputs.get("dicom_seg") else []) \
        + list((outputs.get("meshes") or {}).values())
    stdout_console.print("wrote " + ", ".join(written), highlight=False, markup=False, soft_wrap=True)
    for warning in result["warnings"]:
        sys.stderr.write(f"fastsam3d: warning: {warning}\n")


def _run_batch(manifest: Path, single_only: list[str], json_output: bool, report: Any, **options: Any) -> None:
    """`infer --batch`: run the manifest, print the per-volume table (or JSON), one stderr line per failed line."""
    from fastsam3d_cli.interactive.batch import BatchInterrupted, infer_batch

    if single_only:
        raise UsageError(f"{' and '.join(single_only)} cannot be combined with --batch",
                         "give volumes, click files and outputs in the manifest (columns volume, clicks, output)")
    try:
        result = infer_batch(manifest, progress=report, **options)
    except BatchInterrupted as stop:
        print_error(f"interrupted at manifest line {stop.line}; {stop.finished} finished volume(s) stay written, "
                    "nothing partial was left behind — run the remaining lines again")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    if json_output:
        print_json(result)
    elif not state.quiet:
        _render_batch(result)
    for row in result["rows"]:
        if row["status"] == "failed":
            print_error(f"manifest line {row['line']} ({row['volume']}): {row['error']}")
    for row in result["rows"]:
        for warning in row["warnings"]:
            sys.stderr.write(f"fastsam3d: warning: manifest line {row['line']}: {warning}\n")
    if result["exit_code"]:
        raise typer.Exit(result["exit_code"])


def _render_batch(result: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{result['model']['preset']} on {result['device']} ({result['attention']}), "
                        f"loaded once in {result['load_model_ms'] / 1000:.2f} s", title_justify="left")
    for column, justify in (("line", "right"), ("volume", "left"), ("status", "left"), ("objects (mL)", "left"),
                            ("crops", "right"), ("s", "right"), ("output", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in result["rows"]:
        objects = ", ".join(f"{o['name']} {o['volume_ml']:.2f}" for o in row["objects"])
        table.add_row(str(row["line"]), Text(Path(row["volume"]).name), row["status"], Text(objects),
                      "" if row["crops_run"] is None else str(row["crops_run"]),
                      "" if row["seconds"] is None else f"{row['seconds']:.2f}",
                      Text(row["output"] if row["status"] == "ok" else "-"))
    stdout_console.print(table)
    stdout_console.print(f"{result['ok']} of {len(result['rows'])} volume(s) segmented, {result['failed']} failed, "
                         f"in {result['wall_ms'] / 1000:.2f} s", highlight=False, markup=False)
