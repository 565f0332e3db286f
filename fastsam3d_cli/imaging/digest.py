"""sha256 of a file: one implementation for every digest fastsam3d records (inputs, click files, DICOM series,
cached and bundled weights). Lives in `imaging/` so every layer above can use it.

Large files are hashed through a read-only memory map in a few big slices rather than read in small chunks:
hashlib releases the GIL for each update, so a background hash (weights/cache.py `start_hashing`, overlapping the
torch import of a cold start) gives the GIL back and has to win it again only a few times instead of twice per
MiB. With 1 MiB reads the 638 MB FastSAM3D checkpoint took over 1.3 s in the background against 0.36 s alone.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

CHUNK_BYTES = 1 << 20
MAP_FROM_BYTES = 8 << 20  # smaller files are read in chunks (a map costs more than it saves)
MAPPED_SLICE_BYTES = 64 << 20


def sha256_file(path: str | Path, chunk: int = CHUNK_BYTES) -> str:
    """Hex sha256 of the file at `path` (OSError when it cannot be read)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size >= MAP_FROM_BYTES:
            mapped_digest = _sha256_mapped(handle.fileno())
            if mapped_digest is not None:
                return mapped_digest
        digest = hashlib.sha256()
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _sha256_mapped(descriptor: int) -> str | None:
    """The digest through a read-only map, or None where the file cannot be mapped (a pipe, some file systems)."""
    try:
        mapped = mmap.mmap(descriptor, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256()
    with mapped, memoryview(mapped) as view:
        for start in range(0, len(view), MAPPED_SLICE_BYTES):
            with view[start:start + MAPPED_SLICE_BYTES] as part:
                digest.update(part)
    return digest.hexdigest()
