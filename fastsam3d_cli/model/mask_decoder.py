"""3D mask decoder: image embedding + prompt embeddings → low-res mask logits (B, 1, 32, 32, 32) and IoU.

SAM's MaskDecoder in 3D: an IoU token and 4 mask tokens go through the two-way transformer; the image
tokens are upscaled ×4 with two stride-2 transposed convolutions, and each mask token's hypernetwork MLP
gives the 48 weights that turn the upscaled features into one mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastsam3d_cli.model.common import LayerNorm3d, two_level_block_order
from fastsam3d_cli.model.gemm import linear
from fastsam3d_cli.model.transformer import TwoWayTransformer3D


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (keys layers.{i})."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


UPSCALE_CHUNK_ROWS = 1024  # rows of the 16³ grid processed at once: keeps the 8·48-wide features in cache


def upscale_and_project(src: torch.Tensor, upscaling: nn.Sequential, hyper_in: torch.Tensor) -> torch.Tensor:
    """masks = hyper_in @ output_upscaling(src), without materialising the upscaled volume.

    src: (B, C, 8, 8, 8) image tokens; hyper_in: (B, M, C/8) per-mask weights → masks (B, M, 32, 32, 32).
    Each stride-2, kernel-2 transposed convolution writes a disjoint 2×2×2 block per input voxel, so it is
    a per-voxel matrix product. Keeping every voxel's 2×2×2 children together, and finishing the second
    level chunk by chunk (matmul → GELU in place → hypernetwork dot), never builds the 48×32³ feature
    volume: same result as the reference's `hyper_in @ upscaling(src).flatten(2)` within float rounding,
    and several times faster on CPU.
    """
    conv1, norm, act1, conv2, act2 = upscaling
    b, c, d, h, w = src.shape
    c1, c2 = conv1.out_channels, conv2.out_channels
    # Level 1: (B·8³, C) @ (C, 8·C1) with columns ordered (child, channel), so the result viewed as
    # (B, 8³·8, C1) has one row per child, each voxel's 8 children together: no reordering copy, and the
    # bias rides in the product. Rows stay in (voxel, child) order until the final 32³ reshape.
    weight1 = conv1.weight.permute(0, 2, 3, 4, 1).reshape(c, 8 * c1).t()  # (8·C1, C), as `linear` takes it
    x = linear(src.permute(0, 2, 3, 4, 1).reshape(-1, c), weight1, conv1.bias.repeat(8))
    x = act1(F.layer_norm(x.view(b, 8 * d * h * w, c1), (c1,), norm.weight, norm.bias, norm.eps))
    # Level 2: columns ordered (child, channel) so the hypernetwork dot is a plain matmul per chunk.
    weight2 = conv2.weight.permute(0, 2, 3, 4, 1).reshape(c1, 8 * c2).t()  # (8·C2, C1), as `linear` takes it
    bias2 = conv2.bias.repeat(8)
    rows, m = x.shape[1], hyper_in.shape[1]
    chunk = min(UPSCALE_CHUNK_ROWS, rows)
    if torch.is_grad_enabled():  # training: plain differentiable ops
        parts = [act2(linear(x[item, start:start + chunk], weight2, bias2)).view(-1, c2) @ hyper_in[item].t()
                 for item in range(b) for start in range(0, rows, chunk)]
        masks = torch.cat(parts).reshape(b, rows * 8, m)
    else:  # inference: GELU in place, results written into one buffer
        gelu_in_place = isinstance(act2, nn.GELU) and act2.approximate == "none"
        weight2 = weight2.contiguous()
        masks = x.new_empty(b, rows * 8, m)
        for item in range(b):
            hyper = hyper_in[item].t()  # (C2, M)
            for start in range(0, rows, chunk):
                stop = min(start + chunk, rows)
                y = linear(x[item, start:stop], weight2, bias2)
                y = torch._C._nn.gelu_(y) if gelu_in_place else act2(y)
                torch.mm(y.view(-1, c2), hyper, out=masks[item, start * 8:stop * 8])  # (rows·8, M)
    # Rows are in two-level block order (voxel, level-1 child, level-2 child): one gather puts them on the grid.
    _, fine_to_block = two_level_block_order(d, h, w, masks.device)
    return masks.index_select(1, fine_to_block).transpose(1, 2).reshape(b, m, 4 * d, 4 * h, 4 * w)


class MaskDecoder3D(nn.Module):
    """Keys: iou_token, mask_tokens, transformer.*, output_upscaling.*, output_hypernetworks_mlps.*,
    iou_prediction_head.*."""

    def __init__(self, transformer_dim: int, transformer: TwoWayTransformer3D, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, 1 or 3, 32, 32, 32) and predicted IoU (B, 1 or 3).

        With `multimask_output=False` (every 3D pipeline) only mask token 0 is returned, and only its
        hypernetwork is evaluated.
        """
        tokens_wanted = slice(1, None) if multimask_output else slice(0, 1)
        return self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                  tokens_wanted)

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                      tokens_wanted: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """All (or the selected) mask tokens' logits (B, M, 32, 32, 32) and IoU predictions (B, M)."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.shape[0], -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)
        src = image_embeddings
        if src.shape[0] != tokens.shape[0]:
            src = torch.repeat_interleave(src, tokens.shape[0], dim=0)
        src = src + dense_prompt_embeddings
        pos_src = image_pe
        if pos_src.shape[0] != tokens.shape[0]:
            pos_src = torch.repeat_interleave(pos_src, tokens.shape[0], dim=0)
        b, c, x, y, z = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(b, c, x, y, z)
        indices = range(self.num_mask_tokens)[tokens_wanted]
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in indices], dim=1)
        masks = upscale_and_project(src, self.output_upscaling, hyper_in)
        iou_pred = self.iou_prediction_head(iou_token_out)[:, tokens_wanted]
        return masks, iou_pred
