"""fastsam3d: interactive 3D medical segmentation with SAM-Med3D and FastSAM3D.

The command line (`fastsam3d`) is a thin layer over importable functions; everything it does can be
driven from Python. Heavy modules (torch, SimpleITK) are imported lazily so `fastsam3d --help` is fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
