"""Write files so that a reader never sees a half-written one: temp file in the target folder, then rename.

Used for every output the tool writes (masks, sidecars, checkpoints, prepared data, downloads).
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Sequence

from fastsam3d_cli.errors import BadInputError


def check_output_path(path: Path, overwrite: bool, what: str = "output", option: str = "-o",
                      inputs: Sequence[tuple[Path, str]] = ()) -> Path:
    """Validate an output location before any work is done; return it as an absolute path.

    `option` is the command-line option that names this output (it goes into the fix). `inputs` are
    (path, description) pairs the output must never replace, `--overwrite` or not.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and path.is_dir():
        raise BadInputError(f"{what} {path} is a folder", f"give a file name with {option}")
    for source, description in inputs:
        if path.exists() and Path(source).exists() and path.samefile(source):
            raise BadInputError(f"{what} {path} is {description}",
                                f"choose another name with {option}; inputs are never replaced")
    if path.exists() and not overwrite:
        raise BadInputError(f"{what} {path} already exists",
                            f"pass --overwrite to replace it, or choose another name with {option}")
    folder = path.parent
    if not folder.is_dir():
        raise BadInputError(f"output folder {folder} does not exist", f"create it first or choose another {option}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"output folder {folder} is not writable", f"choose a writable location with {option}")
    return path


def check_output_folder(folder: Path, option: str) -> Path:
    """Validate a folder of outputs (it may not exist yet; its parent must) before any work; return it absolute.

    `option` names it on the command line (e.g. "--mesh"): it goes into the message and the fix.
    """
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"{option} {folder} is a file, not a folder", "give a folder")
    parent = folder if folder.is_dir() else folder.parent
    if not parent.is_dir():
        raise BadInputError(f"output folder {parent} does not exist",
                            f"create it first or choose another {option} folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"output folder {parent} is not writable", f"choose a writable {option} folder")
    return folder


def _new_file_mode() -> int:
    """The mode `open()` gives a new file (0o666 minus the umask); mkstemp's temp files are only 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_NEW_FILE_MODE = _new_file_mode()


def _temp_name(path: Path) -> Path:
    """A unique hidden name beside `path` that keeps its (possibly double) suffix."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, _NEW_FILE_MODE)  # outputs readable like any other file, not 0o600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


class AtomicGroup:
    """Outputs that must appear together: `path(final)` hands out a temporary file beside each one."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        tmp = _temp_name(Path(final))
        self.pairs.append((tmp, Path(final)))
        return tmp


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Defer Ctrl-C (SIGINT) and SIGTERM for a few renames: they take effect right after the last one.

    The handlers are swapped for one that only remembers the signal (masking the signal would not do: the
    kernel may hand it to another thread, e.g. one of torch's). Main thread only; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)  # Python's SIGINT handler raises KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])


@contextlib.contextmanager
def atomic_group() -> Iterator[AtomicGroup]:
    """All-or-nothing outputs: write each to `group.path(final)`; when the block succeeds, every temporary
    file is renamed onto its final path with Ctrl-C held off. On any failure (a failing rename included)
    no temporary file is left, and the outputs renamed so far are deleted again."""
    group = AtomicGroup()
    try:
        yield group
        with _interrupts_held():
            renamed: list[Path] = []
            try:
                for tmp, final in group.pairs:
                    if tmp.exists():
                        os.chmod(tmp, _NEW_FILE_MODE)
                    os.replace(tmp, final)
                    renamed.append(final)
            except BaseException:
                for final in renamed:
                    with contextlib.suppress(FileNotFoundError):
                        final.unlink()
                raise
    finally:
        for tmp, _ in group.pairs:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
