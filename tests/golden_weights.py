"""Import helper for the golden folder's `weights_rule.py` (the deterministic-weight generator)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_weights_rule(golden_dir: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("weights_rule", golden_dir / "weights_rule.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def golden_state_dict(golden_dir: Path, manifest: str) -> dict:
    """Deterministic weights for `keys_sam_med3d.json` / `keys_fastsam3d.json`."""
    rule = load_weights_rule(golden_dir)
    return rule.make_state_dict(rule.entries_from_manifest(str(golden_dir / manifest)))


def golden_inputs():
    """The image, points, labels and mask prompt the golden outputs were computed from (golden README §2)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    image = torch.randn(1, 1, 128, 128, 128, generator=g)
    coords = torch.tensor([[[64.0, 60.0, 70.0], [30.0, 90.0, 50.0]]], dtype=torch.float32)
    labels = torch.tensor([[1, 0]], dtype=torch.int64)
    g = torch.Generator().manual_seed(99)
    mask = torch.randn(1, 1, 32, 32, 32, generator=g) * 2.0
    return image, coords, labels, mask
