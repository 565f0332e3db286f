"""Volumes and geometry: reading and writing images, click files, crop boxes, atomic writes, file locks.

Depends only on `fastsam3d_cli.errors`; every layer above reads and writes files through it.
"""
from __future__ import annotations

import sys

# The isotropic spacing every published model was trained at (prepare's default). Here, not in crops.py, so the
# command line can show it as a default without importing numpy (`fastsam3d --help` stays light).
MODEL_SPACING_MM = 1.5


def preload_nibabel() -> None:
    """Import nibabel without the optional pydicom it would import too (a cold-start cost for NIfTI input).

    nibabel imports pydicom at import time whenever it is installed (for its own DICOM reader, which this
    tool never uses), and pydicom pulls in PIL and requests: 0.2–0.7 s of every cold `fastsam3d infer` with
    the [dicom] extra installed. Hiding pydicom while nibabel is first imported turns that off in nibabel
    only; `import pydicom` works as before afterwards (the DICOM input reads it directly).
    """
    if "nibabel" in sys.modules or "pydicom" in sys.modules:
        return
    sys.modules["pydicom"] = None  # type: ignore[assignment]  # makes `import pydicom` fail inside nibabel
    try:
        import nibabel  # noqa: F401
    except ImportError:
        pass  # reported where nibabel is used
    finally:
        if sys.modules.get("pydicom", 0) is None:
            del sys.modules["pydicom"]
