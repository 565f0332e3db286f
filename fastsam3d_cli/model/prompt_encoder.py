"""3D prompt encoder: clicks → sparse embeddings, previous low-res logits → dense embedding.

Faithful to SAM-Med3D's PromptEncoder3D, including two inherited quirks the weights were trained with:
the random-Fourier encoding concatenates [sin, cos, sin], and the dense positional grid swaps axes 0 and 1
(voxel (i, j, k) gets coordinates ((j+.5)/8, (i+.5)/8, (k+.5)/8)). Only points are supported (the
reference box path indexes embeddings that do not exist).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastsam3d_cli.model.common import LayerNorm3d, two_level_block_order
from fastsam3d_cli.model.gemm import linear


def downscale_mask(masks: torch.Tensor, downscaling: nn.Sequential) -> torch.Tensor:
    """mask_downscaling(masks) as three per-voxel matrix products, channels-last.

    masks (B, 1, 4S, 4S, 4S) → (B, C, S, S, S). Both stride-2, kernel-2 convolutions read disjoint 2×2×2
    blocks, so each is a matmul over one coarse voxel's children; grouping every 8³-grid voxel's 4×4×4
    input block up front means no reordering in between. Same arithmetic as the reference modules within
    float rounding, several times faster on CPU than `slow_conv3d` with tiny channel counts. The result
    is a (B, C, S, S, S) view of a channels-last tensor.
    """
    conv1, norm1, act1, conv2, norm2, act2, conv3 = downscaling
    b, _, size = masks.shape[:3]
    s = size // 4
    c1, c2, c3 = conv1.out_channels, conv2.out_channels, conv3.out_channels
    # Rows in two-level block order (coarse voxel, child, grandchild), 8 grandchildren per row; one gather.
    block_to_fine, _ = two_level_block_order(s, s, s, masks.device)
    blocks = masks.reshape(b, -1).index_select(1, block_to_fine).reshape(-1, 8)
    x = linear(blocks, conv1.weight.reshape(c1, 8), conv1.bias)  # (B·S³·8, C1)
    x = act1(F.layer_norm(x, (c1,), norm1.weight, norm1.bias, norm1.eps)).reshape(-1, 8 * c1)
    x = linear(x, conv2.weight.permute(0, 2, 3, 4, 1).reshape(c2, 8 * c1), conv2.bias)  # (B·S³, C2)
    x = act2(F.layer_norm(x, (c2,), norm2.weight, norm2.bias, norm2.eps))
    x = linear(x, conv3.weight.reshape(c3, c2), conv3.bias)  # (B·S³, C)
    return x.reshape(b, s, s, s, c3).permute(0, 4, 1, 2, 3)


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of coordinates in [0, 1]³ (buffer `positional_encoding_gaussian_matrix`)."""

    def __init__(self, num_pos_feats: int, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (..., 3) in [0, 1] → (..., 3·num_pos_feats) = [sin, cos, sin]."""
        matrix = self.positional_encoding_gaussian_matrix
        coords = 2 * coords.to(matrix.dtype) - 1
        coords = coords @ matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Dense encoding of a size[0]×size[1]×size[2] grid → (C, X, Y, Z), axes 0/1 swapped as trained."""
        x, y, z = size
        matrix = self.positional_encoding_gaussian_matrix
        grid = torch.ones((x, y, z), device=matrix.device, dtype=matrix.dtype)
        y_embed = (grid.cumsum(dim=0) - 0.5) / y
        x_embed = (grid.cumsum(dim=1) - 0.5) / x
        z_embed = (grid.cumsum(dim=2) - 0.5) / z
        pe = self._pe_encoding(torch.stack([x_embed, y_embed, z_embed], dim=-1))
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int, int]) -> torch.Tensor:
        """Encode unnormalised coordinates (B, N, 3) given in voxels of an image of `image_size`."""
        coords = coords.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[0]
        coords[:, :, 1] = coords[:, :, 1] / image_size[1]
        coords[:, :, 2] = coords[:, :, 2] / image_size[2]
        return self._pe_encoding(coords)


class PromptEncoder3D(nn.Module):
    """Keys: pe_layer.*, point_embeddings.{0,1}, not_a_point_embed, mask_downscaling.*, no_mask_embed."""

    def __init__(self, embed_dim: int, image_embedding_size: int, input_image_size: int, mask_in_chans: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = (image_embedding_size,) * 3
        self.input_image_size = (input_image_size,) * 3
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)  # [sin, cos, sin] × 128 = 384
        # Two point embeddings: 0 = exclude (negative), 1 = include (positive).
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the embedding grid, (1, C, 8, 8, 8).

        It depends only on the (untrained) Gaussian buffer, so it is cached per buffer state, device, dtype
        and inference mode — one less sin/cos pass over the grid per click, and no per-click layout copy.
        """
        matrix = self.pe_layer.positional_encoding_gaussian_matrix
        version = None if matrix.is_inference() else matrix._version  # inference tensors keep no counter
        key = (id(matrix), matrix.data_ptr(), version, matrix.device, matrix.dtype, torch.is_inference_mode_enabled())
        cached = getattr(self, "_dense_pe_cache", None)
        if cached is None or cached[0] != key:
            # Stored channels-last: the decoder's (B, X·Y·Z, C) token view of it is then already contiguous.
            pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
            cached = (key, pe.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3))
            self._dense_pe_cache = cached
        return cached[1]

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """points (B, N, 3) voxel indices in the crop, labels (B, N) → (B, N+1, C) with the padding point."""
        points = points + 0.5  # voxel centre
        padding_point = torch.zeros((points.shape[0], 1, 3), device=points.device, dtype=points.dtype)
        padding_label = -torch.ones((labels.shape[0], 1), device=labels.device)
        points = torch.cat([points, padding_point], dim=1)
        labels = torch.cat([labels, padding_label], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        embedding[labels == -1] = 0.0
        embedding[labels == -1] += self.not_a_point_embed.weight
        embedding[labels == 0] += self.point_embeddings[0].weight
        embedding[labels == 1] += self.point_embeddings[1].weight
        return embedding

    def forward(self, points: tuple[torch.Tensor, torch.Tensor] | None,
                masks: torch.Tensor | None, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N+1, C) and dense (B, C, 8, 8, 8) embeddings.

        points: (coords (B, N, 3) float voxel index in the 128³ crop, labels (B, N) 1/0), or None.
        masks: previous low-res logits (B, 1, 32, 32, 32), or None (→ the learned no-mask embedding).
        """
        if points is not None:
            batch_size = points[0].shape[0]
        elif masks is not None:
            batch_size = masks.shape[0]
        weight = self.no_mask_embed.weight
        sparse = torch.empty((batch_size, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0].to(weight.dtype), points[1])], dim=1)
        if masks is not None:
            dense = downscale_mask(masks, self.mask_downscaling)
        else:
            dense = weight.reshape(1, -1, 1, 1, 1).expand(batch_size, -1, *self.image_embedding_size)
        return sparse, dense
