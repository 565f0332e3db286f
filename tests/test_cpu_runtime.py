"""Process-wide CPU tuning applied when a model is built for the CPU."""
from __future__ import annotations

import platform

import pytest
import torch

from fastsam3d_cli.model import build_model
from fastsam3d_cli.model import cpu_runtime


def test_building_a_cpu_model_flushes_subnormal_floats():
    torch.set_flush_denormal(False)
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0
    build_model("fastsam3d-tiny", "exact", "cpu")
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is glibc-only")
def test_malloc_keeps_freed_memory_on_glibc(monkeypatch):
    monkeypatch.delenv("FASTSAM3D_MALLOC_TUNING", raising=False)
    assert cpu_runtime.keep_freed_memory() is True


def test_malloc_tuning_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FASTSAM3D_MALLOC_TUNING", "0")
    monkeypatch.setattr(cpu_runtime, "_malloc_tuned", None)
    assert cpu_runtime.keep_freed_memory() is False
    assert cpu_runtime._malloc_tuned is None  # nothing was called
