"""`fastsam3d infer --batch`: several volumes with their click files, the model loaded once.

    result = infer_batch("cases.csv")            # columns volume, clicks[, output]
    [row["status"] for row in result["rows"]]    # "ok" / "failed" / "not run"

The manifest is a CSV file with a header row naming the columns `volume` and `clicks`, and optionally
`output` (default: `<volume stem>_mask.nii.gz` beside the volume, as `infer`). Relative paths are relative
to the manifest's folder. Empty lines are skipped.

Rules (docs/infer.md):
* Before anything runs, the whole manifest is checked: its columns, every row's volume and click file
  (exist; the click file is valid), every row's outputs (an existing one only with --overwrite, never an
  input of any row, no two rows writing the same file). A bad manifest or row is one error (exit 2 or 3)
  naming the manifest line, and nothing is loaded or written.
* The model is then loaded once and the rows run in order, each with `infer`'s all-or-nothing writes.
  A row that fails while running (a volume that cannot be read, a click outside its volume) is reported
  with its one-line error and leaves nothing behind; the other rows still run. The exit status is then
  the first failed row's code. Weights and device errors, and Ctrl-C, stop the batch: finished rows stay
  (each is complete), the row in progress leaves nothing, later rows are "not run".
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastsam3d_cli.errors import BadInputError, DeviceError, ExitCode, FastSAM3DError, UsageError, WeightsError

COLUMNS = ("volume", "clicks", "output")
REQUIRED = ("volume", "clicks")
Progress = Callable[[str], None]


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a batch: which manifest line was running and how many volumes had finished (kept)."""

    def __init__(self, line: int, finished: int) -> None:
        super().__init__(f"interrupted at manifest line {line}")
        self.line = line
        self.finished = finished


@dataclass
class BatchRow:
    """One manifest row, paths resolved against the manifest's folder."""

    line: int  # line number in the manifest file (the header is line 1)
    volume: Path
    clicks: Path
    output: Path | None


def read_manifest(manifest: str | Path) -> list[BatchRow]:
    """Parse the manifest CSV (BadInputError, exit 3, naming the line for anything wrong)."""
    path = Path(manifest).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise BadInputError(f"manifest {path} {what}", "give a CSV file with columns volume, clicks[, output]")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from a spreadsheet export is not part of a name
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"manifest {path} cannot be read ({getattr(exc, 'strerror', None) or exc})",
                            "give a UTF-8 CSV file with columns volume, clicks[, output]") from None
    rows = list(csv.reader(text.splitlines()))
    numbered = [(number, row) for number, row in enumerate(rows, start=1) if any(cell.strip() for cell in row)]
    if not numbered:
        raise BadInputError(f"manifest {path} is empty", "its first line names the columns: volume,clicks[,output]")
    header_line, header = numbered[0]
    names = [cell.strip().lower() for cell in header]
    unknown = [name for name in names if name not in COLUMNS]
    missing = [name for name in REQUIRED if name not in names]
    if unknown or missing or len(set(names)) != len(names):
        problem = (f"unknown column(s) {', '.join(repr(n) for n in unknown)}" if unknown else
                   f"no {' or '.join(repr(m) for m in missing)} column" if missing else "a column named twice")
        raise BadInputError(f"manifest {path} line {header_line}: {problem}",
                            "the first line names the columns: volume,clicks[,output]")
    if len(numbered) == 1:
        raise BadInputError(f"manifest {path} lists no volumes", "add one line per volume: VOLUME,CLICKS[,OUTPUT]")
    base = path.parent
    parsed = []
    for number, row in numbered[1:]:
        if len(row) != len(names):
            raise BadInputError(f"manifest {path} line {number}: {len(row)} field(s), the header has {len(names)}",
                                "one value per column (quote a path that contains a comma)")
        values = {name: cell.strip() for name, cell in zip(names, row)}
        for name in REQUIRED:
            if not values[name]:
                raise BadInputError(f"manifest {path} line {number}: the {name} is empty", f"give the {name} path")
        output = values.get("output") or None
        parsed.append(BatchRow(number, _resolve(base, values["volume"]), _resolve(base, values["clicks"]),
                               _resolve(base, output) if output else None))
    return parsed


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def check_rows(manifest: Path, rows: list[BatchRow], overwrite: bool) -> list[Path]:
    """Every row's inputs and outputs, checked before anything runs; the labelmap each row will write."""
    from fastsam3d_cli.imaging.clickfile import read_click_file
    from fastsam3d_cli.interactive.export import labelmap_and_format
    from fastsam3d_cli.interactive.infer import _plan_outputs, sidecar_path

    planned: list[Path] = []
    inputs = {row.volume.absolute(): row for row in rows} | {row.clicks.absolute(): row for row in rows}
    written: dict[Path, int] = {}
    for row in rows:
        where = f"manifest {manifest} line {row.line}"
        with _located(where):
            if not row.volume.exists():
                raise BadInputError(f"volume {row.volume} does not exist", "check the path in the manifest")
            read_click_file(row.clicks)
            labelmap, _ = labelmap_and_format(row.volume, row.output, None)  # infer's own naming (DICOM, .dcm)
            outputs = _plan_outputs(row.volume, row.clicks, labelmap, None, None, overwrite)
        for path in (outputs.labelmap, sidecar_path(outputs.labelmap)):
            key = path.absolute()
            if key in written:
                raise BadInputError(f"{where}: writes {path}, as line {written[key]} does",
                                    "give each line its own output")
            other = inputs.get(key)
            if other is not None:
                raise BadInputError(f"{where}: would write {path}, an input of line {other.line}",
                                    "choose another output for this line")
            written[key] = row.line
        planned.append(outputs.labelmap)
    return planned


class _located:
    """Re-raise a FastSAM3DError with `where` in front of its message (same class, fix and exit code)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, FastSAM3DError):
            raise type(exc)(f"{self.where}: {exc.message}", exc.fix, exc.details) from None
        return False


def infer_batch(manifest: str | Path, *, model: str | None = None, checkpoint: str | Path | None = None,
                device: str = "auto", attention: str = "auto", overwrite: bool = False, max_crops: int = 8,
                channel: int | None = None, offline: bool | None = None, dtype: str = "float32",
                progress: Progress | None = None) -> dict[str, Any]:
    """Run `infer_file` for every manifest row with one loaded model; return a per-row summary.

    Raises (nothing written, no model loaded) for a bad manifest or row, and for usage errors; weights and
    device errors and Ctrl-C propagate (rows finished before stay written). Row failures while running are
    recorded in the result (`status` "failed", `error`, `exit_code`); `exit_code` at the top is the first
    failed row's code, or 0.
    """
    from fastsam3d_cli.device import resolve_device
    from fastsam3d_cli.interactive.infer import check_usage, infer_file
    from fastsam3d_cli.weights.loading import load_inference_model

    say = progress or (lambda stage: None)
    wall_start = time.perf_counter()
    check_usage(max_crops, channel, (model, dtype, attention, device))
    manifest_path = Path(manifest).expanduser()
    rows = read_manifest(manifest_path)
    planned = check_rows(manifest_path, rows, overwrite)
    torch_device = resolve_device(device)

    say("loading the model")
    loaded = load_inference_model(model, checkpoint, torch_device, attention, offline, progress=progress is not None,
                                  dtype=dtype)
    results: list[dict[str, Any]] = [_row_entry(row, out, "not run") for row, out in zip(rows, planned)]
    first_failure = 0
    for index, row in enumerate(rows):
        label = f"[{index + 1}/{len(rows)}] {row.volume.name}"
        start = time.perf_counter()
        try:
            sidecar = infer_file(row.volume, row.clicks, row.output, loaded=loaded, overwrite=overwrite,
                                 max_crops=max_crops, channel=channel,
                                 progress=(lambda stage, label=label: say(f"{label}: {stage}")))
        except (WeightsError, DeviceError, UsageError):
            raise  # the same for every row: stop (finished rows stay written)
        except KeyboardInterrupt:
            raise BatchInterrupted(row.line, sum(r["status"] == "ok" for r in results)) from None
        except FastSAM3DError as exc:
            if exc.exit_code == ExitCode.INTERRUPTED:  # a Ctrl-C reported as an error: stop as for Ctrl-C
                raise BatchInterrupted(row.line, sum(r["status"] == "ok" for r in results)) from None
            results[index].update(status="failed", error=exc.one_line(), exit_code=int(exc.exit_code),
                                  seconds=round(time.perf_counter() - start, 3))
            first_failure = first_failure or int(exc.exit_code)
            continue
        results[index].update(
            status="ok", exit_code=0, seconds=round(time.perf_counter() - start, 3),
            output=sidecar["outputs"]["labelmap"], sidecar=sidecar["outputs"]["sidecar"],
            crops_run=sidecar["crops_run"], warnings=sidecar["warnings"],
            objects=[{"name": o["name"], "label": o["label"], "voxels": o["voxels"], "volume_ml": o["volume_ml"]}
                     for o in sidecar["objects"]],
            timings_ms={k: v for k, v in sidecar["timings_ms"].items() if not isinstance(v, list)})
    statuses = [r["status"] for r in results]
    return {
        "manifest": str(manifest_path.absolute()),
        "model": {"preset": loaded.preset, "weights_name": loaded.weights_name, "checkpoint": str(loaded.checkpoint),
                  "checkpoint_sha256": loaded.checkpoint_sha256},
        "device": str(loaded.device), "attention": loaded.attention, "dtype": loaded.dtype,
        "load_model_ms": round(loaded.load_ms, 2), "wall_ms": round((time.perf_counter() - wall_start) * 1000.0, 2),
        "ok": statuses.count("ok"), "failed": statuses.count("failed"),
        "exit_code": first_failure or int(ExitCode.OK),
        "rows": results,
    }


def _row_entry(row: BatchRow, output: Path, status: str) -> dict[str, Any]:
    return {"line": row.line, "volume": str(row.volume), "clicks": str(row.clicks), "output": str(output),
            "sidecar": None, "status": status, "exit_code": None, "error": None, "seconds": None, "crops_run": None,
            "objects": [], "warnings": [], "timings_ms": None}
