"""Write files so that a reader never sees a half-written one: temp file in the target folder, then rename.

Used for every output the tool writes (masks, sidecars, checkpoints, prepared data, downloads).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from fastsam3d_cli.errors import BadInputError


def check_output_path(path: Path, overwrite: bool, what: str = "output") -> Path:
    """Validate an output location before any work is done; return it as an absolute path."""
    path = Path(path).expanduser().absolute()
    if path.exists() and path.is_dir():
        raise BadInputError(f"{what} {path} is a folder", "give a file name")
    if path.exists() and not overwrite:
        raise BadInputError(f"{what} {path} already exists", "pass --overwrite to replace it, or choose another name with -o")
    folder = path.parent
    if not folder.is_dir():
        raise BadInputError(f"output folder {folder} does not exist", "create it first or choose another -o")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"output folder {folder} is not writable", "choose a writable location with -o")
    return path


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
