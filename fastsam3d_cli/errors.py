"""User-facing errors and the documented exit codes.

Every error a user can cause is raised as a `FastSAM3DError` subclass carrying the problem and the fix;
the CLI prints it as one line on stderr and exits with the class's code. One source of truth for codes.
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of every `fastsam3d` command (documented in README.md)."""

    OK = 0
    INTERNAL = 1  # a bug: please report it (run with --debug for the traceback)
    USAGE = 2  # bad command-line usage (unknown option, bad value)
    BAD_INPUT = 3  # unreadable volume, invalid click file or dataset, click outside the volume
    WEIGHTS = 4  # checkpoint missing, corrupt, mismatched or not downloadable
    DEVICE = 5  # device unavailable (e.g. CUDA asked for but absent) or out of memory
    INTERRUPTED = 130  # Ctrl-C


class FastSAM3DError(Exception):
    """Base class: an error with a one-line message, an optional fix and an exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, fix: str | None = None, details: list[str] | None = None) -> None:
        self.message = " ".join(str(message).split())
        self.fix = " ".join(fix.split()) if fix else None
        # Optional short context printed BEFORE the one-line error (e.g. a checkpoint key diff).
        self.details = list(details or [])
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The single line printed on stderr: the problem, then how to fix it."""
        return f"{self.message} — {self.fix}" if self.fix else self.message


class UsageError(FastSAM3DError):
    """The command line asks for something contradictory or impossible."""

    exit_code = ExitCode.USAGE


class BadInputError(FastSAM3DError):
    """Input data (volume, click file, dataset, output location) is unusable."""

    exit_code = ExitCode.BAD_INPUT


class WeightsError(FastSAM3DError):
    """A checkpoint is missing, corrupt, unsafe, for another model, or cannot be downloaded."""

    exit_code = ExitCode.WEIGHTS


class Interrupted(FastSAM3DError):
    """Ctrl-C where something was kept on purpose (e.g. a resumable cache): the line says what, and how to go on."""

    exit_code = ExitCode.INTERRUPTED


class DeviceError(FastSAM3DError):
    """The requested device is not available, or it ran out of memory."""

    exit_code = ExitCode.DEVICE
