"""`fastsam3d weights ...`: list, download, verify, locate, import and remove named checkpoints; bundle a
trained checkpoint as the package's bundled model.

Each command calls one function of `fastsam3d_cli.weights.cache` (or `.bundled`) and renders its result
(Rich table or JSON).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import typer

from fastsam3d_cli.cli.common import cli_errors, print_error, print_json, progress_enabled, state, stdout_console
from fastsam3d_cli.errors import BadInputError, ExitCode, WeightsError

weights_app = typer.Typer(
    help="Get, cache and verify the model checkpoints (`fastsam3d`, `sam-med3d-turbo`).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

CHECK_LEGEND = ("check: pinned = sha256 fixed in the registry; recorded = sha256 recorded at the first "
                "download/import and compared on every load; unverified = nothing recorded yet")
JSON_OPTION = typer.Option(False, "--json", help="Print the result as one JSON object on stdout (for scripts).")


def _names() -> list[str]:
    from fastsam3d_cli.weights.cache import BUILTIN_REGISTRY

    return list(BUILTIN_REGISTRY)


def _name_argument() -> Any:
    return typer.Argument(..., metavar="NAME", autocompletion=_names,
                          help="Checkpoint name: fastsam3d or sam-med3d-turbo (see `fastsam3d weights list`).")


def _bundled_state() -> tuple[Any, Optional[str]]:
    """(the shipped bundled model or None, the sha256 of its file); WeightsError when its manifest is damaged."""
    from fastsam3d_cli.weights import bundled

    model = bundled.installed()
    return model, (bundled.file_sha256(model) if model is not None else None)


def _bundled_json(model: Any, digest: Optional[str]) -> Optional[dict]:
    return None if model is None else {**model.to_dict(), "file_sha256": digest, "verified": digest == model.sha256}


def _render_bundled(model: Any, digest: Optional[str]) -> None:
    from rich.table import Table

    from fastsam3d_cli.weights.bundled import BUNDLED_DIR

    if model is None:
        _say(f"bundled model: none shipped with this installation ({BUNDLED_DIR})")
        return
    # One row per field: the 64-character sha256 and the path stay whole (folded, never cut) at any width.
    table = Table(title="bundled model (ships with the package; `--model bundled`, and the default when the "
                        "published weights cannot be fetched)", title_justify="left", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for field, value in (("name", model.name), ("preset", model.preset), ("size", _size_text(model.size_bytes, 0)),
                         ("dtype", model.dtype), ("sha256", model.sha256),
                         ("verified", "yes" if digest == model.sha256 else "NO (sha256 mismatch)"),
                         ("path", str(model.path))):
        table.add_row(field, value)
    stdout_console.print(table)


def _fail_if_bundled_damaged(model: Any, digest: Optional[str]) -> None:
    from fastsam3d_cli.weights.bundled import check_digest

    if model is not None:
        check_digest(model, digest)  # the one-line error that names the fix (reinstall); the file is not re-read


def _size_text(size_bytes: Optional[int], approx_size_mb: int) -> str:
    return f"{size_bytes / 1e6:.1f} MB" if size_bytes else f"~{approx_size_mb} MB"


def _verified_text(verified: Optional[bool], cached: bool) -> str:
    if not cached:
        return "-"
    return {True: "yes", False: "NO (sha256 mismatch)", None: "nothing to compare"}[verified]


def _say(text: str) -> None:
    if not state.quiet:
        stdout_console.print(text, highlight=False, markup=False)


def _render_table(entries: list, title: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption=CHECK_LEGEND, caption_justify="left")
    for column in ("name", "preset", "size", "cached", "check", "verified"):
        table.add_column(column, no_wrap=True)
    table.add_column("path", overflow="fold")
    for entry in entries:
        table.add_row(entry.name, entry.preset, _size_text(entry.size_bytes, entry.approx_size_mb),
                      "yes" if entry.cached else "no", entry.check, _verified_text(entry.verified, entry.cached),
                      str(entry.path))
    stdout_console.print(table)


@weights_app.command("list")
@cli_errors
def list_command(json_output: bool = JSON_OPTION) -> None:
    """List the named checkpoints (preset, size, cached?, how and whether verified, path) and the bundled model
    (size, sha256; exit 4 if its file is damaged)."""
    from fastsam3d_cli.weights.cache import cache_dir, list_weights

    entries = list_weights()
    shipped, digest = _bundled_state()
    if json_output:
        print_json({"cache_dir": str(cache_dir()), "weights": [e.to_dict() for e in entries],
                    "bundled": _bundled_json(shipped, digest)})
    else:
        _render_table(entries, f"weights cache: {cache_dir()}")
        _render_bundled(shipped, digest)
    _fail_if_bundled_damaged(shipped, digest)


@weights_app.command("download")
@cli_errors
def download_command(
    name: str = _name_argument(),
    offline: bool = typer.Option(False, "--offline", envvar="FASTSAM3D_OFFLINE",
                                 help="Never download: succeed only if a verified copy is cached."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Download NAME into the cache (resumable, verified). Does nothing if a verified copy is there."""
    from fastsam3d_cli.weights.cache import download

    try:
        entry = download(name, progress=progress_enabled(json_output), offline=offline)
    except KeyboardInterrupt:
        _interrupted(name)
    if json_output:
        print_json({**entry.to_dict(), "downloaded": entry.downloaded})
        return
    _say(f"{'downloaded' if entry.downloaded else 'already cached'}: {entry.name} -> {entry.path} "
         f"(sha256 {entry.sha256}, {entry.check})")


def _interrupted(name: str) -> NoReturn:
    """One line after Ctrl-C: what was kept for resuming, then exit 130."""
    from fastsam3d_cli.weights.cache import partial_download

    kept = partial_download(name)
    print_error(f"interrupted — kept {kept[1]} bytes in {kept[0]}; run the same command again to resume" if kept
                else "interrupted — nothing partial was left behind")
    raise typer.Exit(int(ExitCode.INTERRUPTED))


@weights_app.command("verify")
@cli_errors
def verify_command(
    name: Optional[str] = typer.Argument(None, metavar="[NAME]", autocompletion=_names,
                                         help="Checkpoint to check (or `bundled`); default: every cached one and "
                                              "the bundled model."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Re-hash cached checkpoints and the bundled model; compare with their pinned, recorded or shipped sha256
    (exit 4 on a mismatch)."""
    from fastsam3d_cli.weights.bundled import file_sha256, is_bundled_name, require_installed
    from fastsam3d_cli.weights.cache import verify

    if is_bundled_name(name):
        entries, shipped = [], require_installed()
        digest = file_sha256(shipped)
    else:
        entries = verify(name)
        shipped, digest = _bundled_state() if name is None else (None, None)
    failed = [e for e in entries if e.verified is False]
    bundled_ok = shipped is None or digest == shipped.sha256
    if json_output:
        print_json({"ok": not failed and bundled_ok, "weights": [e.to_dict() for e in entries],
                    "bundled": _bundled_json(shipped, digest)})
    elif not entries and shipped is None:
        _say("no checkpoints in the cache")
    else:
        if entries:
            _render_table(entries, "verification")
        if shipped is not None:
            _render_bundled(shipped, digest)
    _fail_if_bundled_damaged(shipped, digest)
    if failed:
        names = ", ".join(e.name for e in failed)
        raise WeightsError(f"sha256 mismatch for cached weights: {names}",
                           f"fetch a fresh copy with `fastsam3d weights download {failed[0].name}`")


@weights_app.command("path")
@cli_errors
def path_command(name: str = _name_argument(), json_output: bool = JSON_OPTION) -> None:
    """Print the path of a cached checkpoint, or of the bundled model's file with NAME `bundled`.

    Nothing is downloaded; exit 4 if NAME is not cached or the bundled file fails its sha256."""
    from fastsam3d_cli.weights import bundled
    from fastsam3d_cli.weights.cache import cached_path

    path = bundled.verified_path(bundled.require_installed())[0] if bundled.is_bundled_name(name) \
        else cached_path(name)
    if json_output:
        print_json({"name": name, "path": str(path)})
        return
    stdout_console.print(str(path), highlight=False, markup=False, soft_wrap=True)


@weights_app.command("import")
@cli_errors
def import_command(
    name: str = _name_argument(),
    file: Path = typer.Argument(..., metavar="FILE", help="A copy of the checkpoint obtained elsewhere."),
    replace: bool = typer.Option(False, "--replace",
                                 help="Replace a cached copy whose recorded sha256 differs from FILE's."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Copy FILE into the cache as NAME and record its sha256 (for offline or air-gapped machines)."""
    from fastsam3d_cli.weights.cache import import_file

    entry = import_file(name, file, replace=replace)
    if json_output:
        print_json(entry.to_dict())
        return
    _say(f"imported: {entry.name} -> {entry.path} (sha256 {entry.sha256}, {entry.check})")


@weights_app.command("remove")
@cli_errors
def remove_command(name: str = _name_argument(), json_output: bool = JSON_OPTION) -> None:
    """Delete NAME from the cache, with its recorded sha256."""
    from fastsam3d_cli.weights.cache import remove

    removed = remove(name)
    if json_output:
        print_json({"name": name, "removed": [str(p) for p in removed]})
        return
    _say((f"removed {name}: " + ", ".join(str(p) for p in removed)) if removed else f"{name} was not cached")


@weights_app.command("bundle")
@cli_errors
def bundle_command(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT",
                                      help="A full checkpoint (train's best.pth/last.pth, distill's student.pth)."),
    name: str = typer.Option("fastsam3d-bundled", "--name", help="Name of the bundled model (`--model NAME`)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", metavar="DIR",
                                              help="Where to write <name>.pt + manifest.json (default: the "
                                                   "package's fastsam3d_cli/weights/bundled/)."),
    command: Optional[List[str]] = typer.Option(None, "--command", metavar="TEXT",
                                                help="A command line that made the checkpoint (repeatable, in order)."),
    cpu_hours: Optional[float] = typer.Option(None, "--cpu-hours", help="CPU-hours the training took."),
    notes: Optional[str] = typer.Option(None, "--notes", help="Free text for the manifest."),
    provenance: Optional[str] = typer.Option(None, "--provenance", metavar="JSON_OR_FILE",
                                             help="A JSON object merged into the manifest's provenance (data "
                                                  "sources and mixing, seeds, evaluation, ...): inline "
                                                  "('{\"seed\": 2027}') or the path of a .json file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a bundled model already there."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Convert CHECKPOINT into the bundled model: float16 weights (official key layout, ≤ 40 MB) + manifest.json
    (name, preset, config, sha256, training provenance)."""
    from fastsam3d_cli.weights.bundled import export_bundled

    extra = _read_provenance(provenance) if provenance is not None else None
    model = export_bundled(checkpoint, name=name, output_dir=output_dir, commands=command or (),
                           cpu_hours=cpu_hours, notes=notes, provenance=extra, overwrite=overwrite)
    if json_output:
        print_json(model.to_dict())
        return
    _say(f"bundled: {model.name} ({model.preset}, {model.size_bytes / 1e6:.1f} MB float16, sha256 {model.sha256}) "
         f"-> {model.path}")


def _read_provenance(value: str) -> dict:
    """--provenance: an inline JSON object (the value starts with "{") or a .json file holding one
    (BadInputError otherwise)."""
    inline = value.lstrip().startswith("{")
    what = "--provenance (inline JSON)" if inline else f"--provenance {value}"
    try:
        data = json.loads(value if inline else Path(value).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problem = f"is not valid JSON ({exc})" if inline else f"is not a readable JSON file ({type(exc).__name__})"
        raise BadInputError(f"{what} {problem}", "give a JSON object, e.g. {\"seeds\": [2023]}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{what} holds a JSON {type(data).__name__}, not an object",
                            "give a JSON object, e.g. {\"seeds\": [2023]}")
    return data


def register(app: typer.Typer) -> None:
    """Add the `weights` command group to the main app."""
    app.add_typer(weights_app, name="weights")
