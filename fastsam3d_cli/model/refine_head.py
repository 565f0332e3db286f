"""The refine head: a small full-resolution 3D U-Net that corrects the classical prior on the clicks' box.

The SAM decoder corrects the prior at 32³ (6 mm per voxel on a 128³ crop); what the floor gets wrong is mostly
finer than that (a boundary a few voxels off, a leak through a thin wall). The refine head sees the crop at its
own 1.5 mm, but only on the box around the clicks (interactive/refine.py builds its input):

    channels  the image and its smoothed copy, both normalised by the include clicks' intensity window;
              the floor's region (0/1); proximity to the nearest include click and to the nearest exclude click
    output    logits = head(features) + skip × (2·region − 1)

`head` (the last 1×1×1 convolution) starts at zero and `skip` at 2, so an untrained head returns the floor's
region exactly; training moves both. Three levels (widths 8/16/32 by default, 94,722 weights), GroupNorm and
LeakyReLU, downsampling by strided 2³ convolutions, trilinear upsampling. Any box side works; multiples of 4
avoid rounding in the two downsamplings.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

REFINE_CHANNELS = 5  # image, smoothed image, floor region, include proximity, exclude proximity
REGION_CHANNEL = 2
INITIAL_SKIP = 2.0


def _conv_block(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    groups = 4 if cout % 4 == 0 else 1
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=dilation, dilation=dilation),
                         nn.GroupNorm(groups, cout), nn.LeakyReLU(0.1))


class RefineHead(nn.Module):
    """(B, 5, D, H, W) features → (B, 1, D, H, W) logits; starts as `INITIAL_SKIP` × (2·region − 1)."""

    def __init__(self, widths: Sequence[int] = (8, 16, 32), in_channels: int = REFINE_CHANNELS) -> None:
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.enc1 = _conv_block(in_channels, w1)
        self.enc2 = nn.Sequential(nn.Conv3d(w1, w2, 2, stride=2), _conv_block(w2, w2))
        self.enc3 = nn.Sequential(nn.Conv3d(w2, w3, 2, stride=2), _conv_block(w3, w3), _conv_block(w3, w3, dilation=2))
        self.dec2 = _conv_block(w3 + w2, w2)
        self.dec1 = _conv_block(w2 + w1, w1)
        self.head = nn.Conv3d(w1, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.skip = nn.Parameter(torch.tensor(INITIAL_SKIP))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(features)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[2:], mode="trilinear"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[2:], mode="trilinear"), e1], 1))
        region = features[:, REGION_CHANNEL:REGION_CHANNEL + 1]
        return self.head(d1) + self.skip * (2 * region - 1)


def use_inference_layout(model: nn.Module) -> None:
    """Store a loaded model's refine head channels-last when it runs on the CPU: oneDNN's 3D convolutions are
    ~25 % faster so (interactive/refine.py then feeds it channels-last input; outputs differ by < 1e-4).
    Inference loads only: a head being trained keeps the default layout."""
    head = getattr(model, "refine_head", None)
    if head is not None and next(head.parameters()).device.type == "cpu":
        head.to(memory_format=torch.channels_last_3d)

