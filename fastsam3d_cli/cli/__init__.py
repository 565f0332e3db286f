"""The `fastsam3d` command: one Typer app, one small module per subcommand (see `COMMAND_MODULES`)."""
from __future__ import annotations

import importlib
import importlib.util
import platform
from typing import Optional

import typer

from fastsam3d_cli import __version__
from fastsam3d_cli.cli.common import OneLineErrorGroup, state, stdout_console

app = typer.Typer(
    name="fastsam3d",
    cls=OneLineErrorGroup,
    help="Interactive 3D medical segmentation with SAM-Med3D and FastSAM3D: "
    "segment a CT/MRI volume from a few clicks, prepare nnU-Net data, train, distill, validate and benchmark.",
    no_args_is_help=True,
    add_completion=False,  # one completion story: the static scripts in completions/ (cli/completion.py)
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Subcommands in the order `fastsam3d --help` lists them. Each module defines `register(app)`.
COMMAND_MODULES = ["infer", "serve", "prepare", "train", "distill", "validate", "benchmark", "weights"]


def version_report() -> dict[str, str]:
    """Package, Python, torch, CUDA and flash-attn versions (what `--version` prints)."""
    import torch

    from fastsam3d_cli.device import flash_attn_version

    cuda = (f"available ({torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}, "
            f"{torch.cuda.get_device_name(0)})") if torch.cuda.is_available() else "not available"
    flash = flash_attn_version()
    return {
        "fastsam3d": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": cuda,
        "flash-attn": f"{flash} (installed)" if flash else "not installed (optional: pip install 'fastsam3d-cli[flash]')",
    }


def _version_callback(value: bool) -> None:
    if value:
        for key, val in version_report().items():
            stdout_console.print(f"{key}: {val}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", "-V", callback=_version_callback, is_eager=True,
        help="Print package, torch, CUDA and flash-attn versions and exit."),
    debug: bool = typer.Option(False, "--debug", envvar="FASTSAM3D_DEBUG",
                               help="Show full tracebacks instead of one-line errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or informational output."),
) -> None:
    """Interactive 3D medical segmentation with SAM-Med3D and FastSAM3D."""
    state.debug = debug
    state.quiet = quiet


for _name in COMMAND_MODULES:
    _module_name = f"fastsam3d_cli.cli.{_name}_cmd"
    if importlib.util.find_spec(_module_name) is not None:
        importlib.import_module(_module_name).register(app)


def main() -> None:
    """Console-script entry point; the process ends without the interpreter's teardown (cli/process_exit.py)."""
    from fastsam3d_cli.cli.process_exit import exit_now

    try:
        app(prog_name="fastsam3d")
    except SystemExit as stop:
        exit_now(stop.code)
    exit_now(0)
