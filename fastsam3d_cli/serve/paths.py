"""`--root` confinement: a client names files relative to the root, and nothing outside it is ever read.

Refused with 403: an absolute path, any `..` component, and a path whose real location (symlinks
resolved) is outside the root. Without `--root`, no file can be opened by name (uploads still work).
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from fastsam3d_cli.serve.errors import ApiError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def resolve_under_root(root: Path | None, relative: str) -> Path:
    """The real path of `relative` under `root` (403 outside it or without a root, 404 missing)."""
    if root is None:
        raise ApiError(403, "opening files by path is off: start the server with --root DIR")
    text = str(relative).replace("\\", "/")
    if not text or "\x00" in text:
        raise ApiError(422, "field 'path': give a file path relative to --root")
    pure = PurePosixPath(text)
    if pure.is_absolute() or text.startswith("~") or (len(text) > 1 and text[1] == ":"):
        raise ApiError(403, f"path '{relative}' is absolute; give a path relative to --root")
    if ".." in pure.parts:
        raise ApiError(403, f"path '{relative}' contains '..'; paths must stay under --root")
    real_root = root.resolve()
    real = (real_root / pure).resolve()
    if real != real_root and real_root not in real.parents:
        raise ApiError(403, f"path '{relative}' leads outside --root (through a symbolic link)")
    if not real.exists():
        raise ApiError(404, f"no file '{relative}' under --root")
    return real


def list_images(root: Path | None, limit: int = 2000) -> list[str]:
    """Image files, DICOM `.zip` files and folders holding `.dcm` files under the root (relative POSIX paths; a
    folder ends with '/'), without following links that leave it."""
    if root is None:
        return []
    real_root = root.resolve()
    found: list[str] = []
    for folder, dirs, files in os.walk(real_root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if folder != str(real_root) and any(name.lower().endswith(".dcm") for name in files):
            found.append(Path(folder).relative_to(real_root).as_posix() + "/")
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_SUFFIXES + (".zip",)):
                continue
            path = Path(folder) / name
            real = path.resolve()
            if real_root not in real.parents:
                continue
            found.append(path.relative_to(real_root).as_posix())
            if len(found) >= limit:
                return found
    return found
