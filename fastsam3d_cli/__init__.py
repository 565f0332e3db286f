"""fastsam3d: interactive 3D medical segmentation with SAM-Med3D and FastSAM3D.

The command line (`fastsam3d`) is a thin layer over importable functions; everything it does can be
driven from Python:

    from fastsam3d_cli import Predictor, infer_file, prepare_datasets, run_benchmark, build_model, load_model
    from fastsam3d_cli import train, validate, distill

The package is layered (docs/architecture.md): `errors`/`device` → `model/` → `imaging/` → `weights/` →
`data/` → `interactive/` → `training/` → `benchmark/` → `cli/`; a module never imports a layer above its own.

Heavy modules (torch, SimpleITK) are imported on first use, so `import fastsam3d_cli` and
`fastsam3d --help` stay fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name → module that defines it (imported lazily by __getattr__).
_API = {
    "Predictor": "fastsam3d_cli.interactive.predictor",
    "infer_file": "fastsam3d_cli.interactive.infer",
    "prepare_datasets": "fastsam3d_cli.data.prepare",
    "list_prepared_samples": "fastsam3d_cli.data.prepared",
    "run_benchmark": "fastsam3d_cli.benchmark.speed",
    "resolve_weights": "fastsam3d_cli.weights.cache",
    "build_model": "fastsam3d_cli.model",
    "load_model": "fastsam3d_cli.model.checkpoint",
    "load_inference_model": "fastsam3d_cli.weights.loading",
    "train": "fastsam3d_cli.training.train",
    "validate": "fastsam3d_cli.training.validate",
    "distill": "fastsam3d_cli.training.distill",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fastsam3d_cli' has no attribute '{name}'")
