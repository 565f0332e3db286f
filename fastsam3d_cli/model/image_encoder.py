"""3D ViT image encoder of SAM-Med3D and FastSAM3D: (B,1,128,128,128) → (B,384,8,8,8).

Patch embedding (16³ conv) + absolute position embedding → `depth` transformer blocks (windowed or global
attention with decomposed relative position; optionally attention-free first blocks) → a conv neck.
State-dict keys equal the official checkpoints' (`image_encoder.` prefix added by Sam3D).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastsam3d_cli.model.attention import EncoderAttention
from fastsam3d_cli.model.common import LayerNorm3d, MLPBlock
from fastsam3d_cli.model.config import EncoderConfig
from fastsam3d_cli.model.gemm import linear


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches → channels-last tokens (B, D, H, W, C). Key: `proj` (a Conv3d).

    The stride-equals-kernel convolution is computed as one matrix product over flattened patches: the
    same numbers (within float rounding), and much faster than the convolution kernels on CPU, in
    bfloat16 especially (oneDNN's bf16 path for a 1-channel 16³ kernel is ~50× slower than the GEMM).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        p = self.patch_size
        if d % p or h % p or w % p:
            return self.proj(x).permute(0, 2, 3, 4, 1)
        patches = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(-1, c * p ** 3)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        tokens = linear(patches, weight, self.proj.bias)
        return tokens.reshape(b, d // p, h // p, w // p, -1)


class Block3D(nn.Module):
    """One encoder block. Attention-free blocks have only `norm2` and `mlp` (FastSAM3D's Block3D_woatt).

    Styles: "pre_norm" (SAM-Med3D): x += attn(norm1 x); x += mlp(norm2 x).
            "fastsam3d" (as released): x += attn(norm1 x); x = norm2 x; x += mlp(x).
    """

    def __init__(self, config: EncoderConfig, index: int) -> None:
        super().__init__()
        dim = config.embed_dim
        self.style = config.block_style
        self.window_size = config.block_window_size(index)
        self.has_attention = config.block_has_attention(index)
        if self.has_attention:
            self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
            rel_size = self.window_size if self.window_size > 0 else config.grid_size
            self.attn = EncoderAttention(dim, config.num_heads, config.qkv_bias, config.use_rel_pos, rel_size,
                                         config.rel_pos_layout)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = MLPBlock(dim, int(dim * config.mlp_ratio), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_attention:
            x = x + self._attention(self.norm1(x))
        if self.style == "fastsam3d":
            x = self.norm2(x)
            return x + self.mlp(x)
        return x + self.mlp(self.norm2(x))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention on normalised tokens (B, D, H, W, C): global, or inside zero-padded windows."""
        window = self.window_size
        if window <= 0:
            return self.attn(x)
        d, h, w = x.shape[1:4]
        if self.attn.supports_padded_window() and d == h == w < window:
            return self.attn.forward_padded_window(x, window)
        windows, padded = window_partition(x, window)
        windows = self.attn(windows)
        return window_unpartition(windows, window, padded, (d, h, w))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad (B,D,H,W,C) at the high end to multiples of `window`, split into (B·nW, w, w, w, C)."""
    b, d, h, w, c = x.shape
    pd, ph, pw = (-d) % window, (-h) % window, (-w) % window
    if pd or ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.view(b, dp // window, window, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c)
    return windows, (dp, hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int, int],
                       original: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `window_partition`, cropping the padding away. Returns (B, D, H, W, C)."""
    dp, hp, wp = padded
    d, h, w = original
    b = windows.shape[0] // ((dp // window) * (hp // window) * (wp // window))
    x = windows.view(b, dp // window, hp // window, wp // window, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, :d, :h, :w, :].contiguous()


class ImageEncoderViT3D(nn.Module):
    """The encoder. Keys: pos_embed, patch_embed.proj.*, blocks.{i}.*, neck.{0..3}.*."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        grid = config.grid_size
        self.patch_embed = PatchEmbed3D(config.patch_size, config.in_chans, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList(Block3D(config, i) for i in range(config.depth))
        self.neck = nn.Sequential(
            nn.Conv3d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm3d(config.out_chans, eps=config.norm_eps),
            nn.Conv3d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(config.out_chans, eps=config.norm_eps),
        )

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """volume (B, 1, S, S, S), z-normalised → embedding (B, out_chans, S/16, S/16, S/16)."""
        x = self.patch_embed(volume) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))

    def forward_with_intermediates(self, volume: torch.Tensor,
                                   block_numbers: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Embedding plus the outputs of the listed blocks (1-based numbers), each (B, D, H, W, C).

        Used by distillation (teacher blocks 2, 4, …, 12 ↔ student blocks 1…6) and the parity tests.
        """
        wanted = set(block_numbers)
        outputs: dict[int, torch.Tensor] = {}
        x = self.patch_embed(volume) + self.pos_embed
        for number, block in enumerate(self.blocks, start=1):
            x = block(x)
            if number in wanted:
                outputs[number] = x
        return self.neck(x.permute(0, 4, 1, 2, 3)), outputs
