"""`fastsam3d weights ...`: list, download, verify, locate, import and remove named checkpoints.

Each command calls one function of `fastsam3d_cli.weights.cache` and renders its result (Rich table or JSON).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from fastsam3d_cli.cli.common import cli_errors, print_error, print_json, progress_enabled, state, stdout_console
from fastsam3d_cli.errors import ExitCode, WeightsError

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
    """List the named checkpoints: preset, size, whether cached, how and whether verified, path."""
    from fastsam3d_cli.weights.cache import cache_dir, list_weights

    entries = list_weights()
    if json_output:
        print_json({"cache_dir": str(cache_dir()), "weights": [e.to_dict() for e in entries]})
        return
    _render_table(entries, f"weights cache: {cache_dir()}")


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
                                         help="Checkpoint to check; default: every cached one."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Re-hash cached checkpoints and compare with their pinned or recorded sha256 (exit 4 on a mismatch)."""
    from fastsam3d_cli.weights.cache import verify

    entries = verify(name)
    failed = [e for e in entries if e.verified is False]
    if json_output:
        print_json({"ok": not failed, "weights": [e.to_dict() for e in entries]})
    elif not entries:
        _say("no checkpoints in the cache")
    else:
        _render_table(entries, "verification")
    if failed:
        names = ", ".join(e.name for e in failed)
        raise WeightsError(f"sha256 mismatch for cached weights: {names}",
                           f"fetch a fresh copy with `fastsam3d weights download {failed[0].name}`")


@weights_app.command("path")
@cli_errors
def path_command(name: str = _name_argument(), json_output: bool = JSON_OPTION) -> None:
    """Print the cached checkpoint's path (exit 4 if it is not cached; nothing is downloaded)."""
    from fastsam3d_cli.weights.cache import cached_path

    path = cached_path(name)
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


def register(app: typer.Typer) -> None:
    """Add the `weights` command group to the main app."""
    app.add_typer(weights_app, name="weights")
