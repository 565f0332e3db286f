"""sha256 of a file, read in chunks: one implementation for every digest fastsam3d records (inputs, click
files, DICOM series, cached and bundled weights). Lives in `imaging/` so every layer above can use it."""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 1 << 20


def sha256_file(path: str | Path, chunk: int = CHUNK_BYTES) -> str:
    """Hex sha256 of the file at `path` (OSError when it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
