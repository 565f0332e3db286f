"""model/gemm.py: oneDNN dense layers on the CPU — the values and gradients of F.linear, taken only where
they cannot change what a caller sees (no autocast, tracing or dispatch mode; big enough products)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastsam3d_cli.model import gemm
from fastsam3d_cli.model.common import Linear

needs_onednn = pytest.mark.skipif(not gemm.uses_onednn(), reason="this torch build has no oneDNN linear op")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Count the calls that reach the oneDNN op."""
    calls = []
    real = gemm._onednn_linear

    def counting(*args):
        calls.append(tuple(args[0].shape))
        return real(*args)

    monkeypatch.setattr(gemm, "_onednn_linear", counting)
    return calls


@needs_onednn
@pytest.mark.parametrize("case", ["2d", "3d", "transposed-input", "transposed-weight", "no-bias", "bfloat16"])
def test_linear_equals_f_linear(case, onednn_calls):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 256, generator=generator)
    weight = torch.randn(192, 256, generator=generator)
    bias = torch.randn(192, generator=generator)
    if case == "3d":
        x = x.reshape(3, 100, 256)
    elif case == "transposed-input":
        x = torch.randn(256, 300, generator=generator).t()
    elif case == "transposed-weight":
        weight = torch.randn(256, 192, generator=generator).t()
    elif case == "no-bias":
        bias = None
    elif case == "bfloat16":
        x, weight, bias = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    with torch.inference_mode():
        ours = gemm.linear(x, weight, bias)
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    # bfloat16 runs on oneDNN only where the CPU has its bfloat16 kernels (an AVX2-only CPU falls back to aten)
    expect_onednn = case != "bfloat16" or gemm._ONEDNN_BF16
    assert bool(onednn_calls) == expect_onednn, "the oneDNN path was not taken as expected"
    assert ours.dtype == x.dtype and ours.shape == reference.shape
    tolerance = 2e-2 if case == "bfloat16" else 1e-5
    assert (ours.double() - reference).abs().max() <= tolerance * reference.abs().max()


@needs_onednn
@pytest.mark.parametrize("trainable", ["all", "input-only", "weights-only", "no-bias"])
def test_training_gradients_equal_f_linear(trainable, onednn_calls):
    """The custom backward (two oneDNN products and a sum) gives F.linear's gradients."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 75, 256, generator=generator)
    weight = torch.randn(192, 256, generator=generator)
    bias = None if trainable == "no-bias" else torch.randn(192, generator=generator)
    upstream = torch.randn(4, 75, 192, generator=generator)
    wants = {"all": (True, True), "input-only": (True, False), "weights-only": (False, True),
             "no-bias": (True, True)}[trainable]
    ours = [t.clone().requires_grad_(want) if t is not None else None
            for t, want in zip((x, weight, bias), (wants[0], wants[1], wants[1]))]
    reference = [t.double().requires_grad_(want) if t is not None else None
                 for t, want in zip((x, weight, bias), (wants[0], wants[1], wants[1]))]
    out = gemm.linear(*ours)
    assert out.grad_fn is not None and onednn_calls, "the oneDNN training path was not taken"
    (out * upstream).sum().backward()
    (F.linear(*reference) * upstream.double()).sum().backward()
    for mine, theirs in zip(ours, reference):
        if mine is None or not mine.requires_grad:
            assert mine is None or mine.grad is None
            continue
        assert (mine.grad.double() - theirs.grad).abs().max() <= 1e-5 * theirs.grad.abs().max()


@needs_onednn
def test_autocast_tracing_and_small_products_keep_f_linear(onednn_calls):
    layer = Linear(256, 192)
    with torch.no_grad():
        layer(torch.randn(2, 256))  # 2·256·192 < MIN_MACS
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(torch.randn(300, 256)).dtype == torch.bfloat16  # autocast still applies
        counter = FlopCounterMode(display=False)
        with counter:
            layer(torch.randn(300, 256))
    assert counter.get_total_flops() == 2 * 300 * 256 * 192  # the FLOP counter still sees the product
    assert onednn_calls == []
    with torch.no_grad():
        layer(torch.randn(300, 256))
    assert onednn_calls == [(300, 256)]


def test_linear_layer_has_the_keys_of_nn_linear():
    assert list(Linear(8, 4).state_dict()) == list(nn.Linear(8, 4).state_dict()) == ["weight", "bias"]
    assert isinstance(Linear(8, 4), nn.Linear)


def test_the_environment_variable_turns_onednn_off():
    code = "from fastsam3d_cli.model import gemm; print(gemm.uses_onednn())"
    out = subprocess.run([sys.executable, "-c", code], env={"FASTSAM3D_CPU_GEMM": "aten", "PATH": ""},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
