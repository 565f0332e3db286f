"""Small building blocks shared by the encoder, prompt encoder and decoder."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .gemm import linear


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state_dict keys) whose CPU inference runs on oneDNN (`gemm.py`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor (SAM's LayerNorm2d, in 3D)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class MLPBlock(nn.Module):
    """Linear → activation → Linear (keys `lin1`, `lin2`)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = Linear(embedding_dim, mlp_dim)
        self.lin2 = Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


@functools.lru_cache(maxsize=16)
def two_level_block_order(d: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat-index maps between a (4d, 4h, 4w) grid and its two-level 2×2×2 block order.

    Block order lists every coarse voxel (z, y, x of the (d, h, w) grid), then its 8 children, then each
    child's 8 children; the fine index per axis is 4·coarse + 2·child + grandchild. Returns
    (block_to_fine, fine_to_block): `grid.flatten()[block_to_fine]` is the grid in block order, and
    `blocks[fine_to_block]` puts block-ordered values back on the grid. One gather replaces a 10-axis
    permute that is ~10× slower on CPU.
    """
    def reorder(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return values.reshape(shape).permute(0, 3, 6, 1, 4, 7, 2, 5, 8).reshape(-1)

    count = 64 * d * h * w
    with torch.inference_mode(False):  # cached: must stay usable by autograd even if first built for inference
        block_to_fine = reorder(torch.arange(count, device=device), (d, 2, 2, h, 2, 2, w, 2, 2))
        fine_to_block = reorder(torch.arange(count, device=device), (d, h, w, 2, 2, 2, 2, 2, 2))
    return block_to_fine, fine_to_block
