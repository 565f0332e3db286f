"""Shared plumbing for the command modules: consoles, error handling, JSON output, common options.

Commands only parse arguments, call one API function and render its result; this module turns
`FastSAM3DError`s into one line on stderr plus the documented exit code.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from typing import Any, Callable, TypeVar

import typer
import typer.core
from rich.console import Console

from fastsam3d_cli.errors import ExitCode, FastSAM3DError

F = TypeVar("F", bound=Callable[..., Any])

# Wide enough for any table this tool prints (tables are never expanded, so they keep their natural width).
UNBOUNDED_WIDTH = 400


def _console(stderr: bool) -> Console:
    """A Rich console for stdout or stderr. When the stream is not a terminal (a pipe, `tee`, a log file) and
    COLUMNS is not set, Rich would assume 80 columns and cut table cells (two `sam-m…` rows, a path wrapped
    two characters a line); there the width is unbounded instead, so a logged table reads like the screen."""
    stream = sys.stderr if stderr else sys.stdout
    is_terminal = bool(getattr(stream, "isatty", lambda: False)())
    width = None if is_terminal or os.environ.get("COLUMNS") else UNBOUNDED_WIDTH
    return Console(stderr=stderr, soft_wrap=True, width=width)


# Results go to stdout, everything else (progress, logs, errors) to stderr.
stdout_console = _console(stderr=False)
stderr_console = _console(stderr=True)


class _State:
    """Global flags set by the app callback (`--debug`, `--quiet`)."""

    debug: bool = bool(os.environ.get("FASTSAM3D_DEBUG"))
    quiet: bool = False


state = _State()


def progress_enabled(json_output: bool = False) -> bool:
    """Progress bars only for humans: not with --json/--quiet, and not when stderr is not a terminal."""
    return not (json_output or state.quiet) and sys.stderr.isatty()


class ProgressBars:
    """Rich progress bars on stderr, one per named task, created on first update; a no-op when disabled.

    Every command shares this so bars look alike: description, bar, done/total, elapsed, remaining.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "ProgressBars":
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=stderr_console,
                                      transient=True)
            self._progress.__enter__()
        return self

    def update(self, name: str, completed: int, total: int, description: str) -> None:
        """Set task `name` to `completed` of `total`, with a new description."""
        if self._progress is None:
            return
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(description, total=total, completed=max(completed - 1, 0))
        self._progress.update(self._tasks[name], completed=completed, total=total, description=description)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)


def log_to_stderr(message: str) -> None:
    """An informational line on stderr (no markup: paths may contain brackets)."""
    stderr_console.print(message, markup=False, highlight=False)


def finish_training_command(result: Any, json_output: bool, render: Callable[[Any], None]) -> None:
    """Shared ending of `train` and `distill`: print (rank 0 only), and exit 130 after a Ctrl-C stop."""
    if not result.is_main:
        return
    if json_output:
        print_json(result.to_json())
    elif not state.quiet:
        render(result)
    if result.outcome.stop_reason == "interrupted":
        print_error(f"interrupted at step {result.outcome.global_step}; {result.run_dir / 'last.pth'} is saved — "
                    "continue with --resume")
        raise typer.Exit(int(ExitCode.INTERRUPTED))


def print_error(message: str) -> None:
    """One line on stderr, prefixed so it stands out in logs."""
    # Plain write (not Rich) so a long path is never wrapped onto a second line.
    sys.stderr.write(f"fastsam3d: error: {message}\n")
    sys.stderr.flush()


def print_json(payload: Any) -> None:
    """Write exactly one JSON object on stdout (nothing else goes there with --json)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def cli_errors(func: F) -> F:
    """Decorator for command functions: map known errors to one line + exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except FastSAM3DError as exc:
            if state.debug:
                traceback.print_exc()
            for line in exc.details:
                sys.stderr.write(f"  {line}\n")
            print_error(exc.one_line())
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            print_error("interrupted — nothing partial was left behind")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except Exception as exc:  # noqa: BLE001 - last-resort mapping for the CLI only
            if _is_out_of_memory(exc):
                print_error(f"out of memory: {_first_line(exc)} — use a smaller --batch-size, "
                            "--dtype bfloat16, or --device cpu")
                raise typer.Exit(int(ExitCode.DEVICE)) from None
            if state.debug:
                raise
            print_error(f"internal error: {type(exc).__name__}: {_first_line(exc)} — "
                        "rerun with --debug for the traceback and report it")
            raise typer.Exit(int(ExitCode.INTERNAL)) from None

    return wrapper  # type: ignore[return-value]


try:  # typer >= 0.20 vendors click as typer._click; older releases use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - depends on the installed typer
    import click.exceptions as _click_exceptions
    from click.exceptions import ClickException  # type: ignore[no-redef]

    NoArgsIsHelpError = getattr(_click_exceptions, "NoArgsIsHelpError", ())  # Click < 8.2 has none


class OneLineErrorGroup(typer.core.TyperGroup):
    """The root command group: command-line mistakes (a missing option, an unknown one, a value out of range)
    end like every other error, with one line `fastsam3d: error: <problem> — see '<command> --help'` and exit
    code 2, instead of Click's usage block and a framed error. Help shown for a bare group is unchanged."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError:  # the help was printed when the error was made; keep Click's exit code
            sys.exit(int(ExitCode.USAGE))
        except ClickException as exc:
            context = getattr(exc, "ctx", None)
            command = context.command_path if context is not None else "fastsam3d"
            print_error(f"{' '.join(exc.format_message().split()).rstrip('.')} — see '{command} --help'")
            sys.exit(int(ExitCode.USAGE))  # every Click error is about the command line (FileError's own is 1)
        except typer.Abort:  # Click's Ctrl-C / end of input at a prompt
            print_error("aborted")
            sys.exit(int(ExitCode.INTERRUPTED))
        sys.exit(result if isinstance(result, int) else int(ExitCode.OK))


_PLAIN_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "int range": "INTEGER", "float": "NUMBER",
                     "float range": "NUMBER", "path": "PATH", "file": "FILE", "directory": "DIR"}


def _plain_option_type(self: Any, ctx: Any) -> str | None:
    """An option's value placeholder in --help: its metavar, or a plain word (TEXT, INTEGER, PATH, a|b|c);
    nothing for a flag. Typer's own are Python type names (`<bool>`, `<str>`, `<list[Path]>`)."""
    if getattr(self, "is_flag", False) or getattr(self, "count", False):
        return None
    if self.metavar is not None:
        return self.metavar
    label = str(_TYPER_DISPLAY_TYPE(self, ctx) or "").strip("<>")
    many = label.startswith("list[") or self.nargs != 1
    label = label[5:-1] if label.startswith("list[") else label
    label = _PLAIN_TYPE_NAMES.get(label.lower(), label if "|" in label else label.upper())
    return label + ("..." if many else "")


def _plain_argument_usage(self: Any) -> str:
    """An argument in the usage line the way Click writes it: NAME required, [NAME] optional (Typer: {NAME})."""
    name = self.display_name_raw
    if not self.required and not name.startswith("["):
        name = f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


_TYPER_DISPLAY_TYPE = getattr(typer.core.TyperOption, "display_type", None)
if _TYPER_DISPLAY_TYPE is not None and hasattr(typer.core, "TyperArgument"):  # Typer >= 0.2x renders types itself
    typer.core.TyperOption.display_type_rich = _plain_option_type  # type: ignore[method-assign]
    typer.core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]
    if hasattr(typer.core.TyperArgument, "_usage_display_name"):
        typer.core.TyperArgument._usage_display_name = _plain_argument_usage  # type: ignore[method-assign]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()
