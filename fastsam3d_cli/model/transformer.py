"""Two-way transformer of the 3D mask decoder (SAM's TwoWayTransformer over 8³ image tokens).

Prompt tokens and image tokens attend to each other in both directions; decoder LayerNorms use eps 1e-5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastsam3d_cli.model.common import Linear, MLPBlock


class Attention(nn.Module):
    """Multi-head attention with optional down-projection of q/k/v (keys q_proj, k_proj, v_proj, out_proj).

    The decoder's cross-attentions pair 512 image tokens with only a handful of prompt tokens. There the
    projections of the many tokens are reassociated with the few tokens' vectors (`_few_keys`,
    `_few_queries`): the same softmax(q·kᵀ/√d)·v, within float rounding, with ~3.5× fewer multiply-adds
    on the image side (a 384×(heads·tokens) product instead of a 384×192 projection).
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim / downsample_rate")
        self.q_proj = Linear(embedding_dim, self.internal_dim)
        self.k_proj = Linear(embedding_dim, self.internal_dim)
        self.v_proj = Linear(embedding_dim, self.internal_dim)
        self.out_proj = Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _per_head(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """A projection's weight (heads, d, C_in) and bias (heads, d)."""
        head_dim = self.internal_dim // self.num_heads
        return (linear.weight.reshape(self.num_heads, head_dim, -1),
                linear.bias.reshape(self.num_heads, head_dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) → (B, Nq, C)."""
        n_q, n_k = q.shape[1], k.shape[1]
        if n_k < n_q and n_k * self.num_heads < self.internal_dim:
            return self._few_keys(q, k, v)
        if n_q < n_k and n_q * self.num_heads < self.internal_dim:
            return self._few_queries(q, k, v)
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√d)·v, as the reference
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    def _few_keys(self, x_q: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor) -> torch.Tensor:
        """Many queries, few keys: fold q_proj into the keys and out_proj into the values.

        logits_h = (x_q W_qhᵀ + b_qh) k_hᵀ/√d = x_q (W_qhᵀ k_hᵀ)/√d + b_qh k_hᵀ/√d, and
        out = Σ_h P_h (v_h W_ohᵀ) + b_o — two products with heads·N_k columns instead of 192.
        """
        b, n_q, _ = x_q.shape
        scale = (self.internal_dim // self.num_heads) ** -0.5
        k = self._split_heads(self.k_proj(x_k))  # (B, H, Nk, d)
        v = self._split_heads(self.v_proj(x_v))
        w_q, b_q = self._per_head(self.q_proj)
        n_k = k.shape[2]
        # Columns ordered (key, head): the softmax over keys then runs along a strided middle axis, which
        # PyTorch's CPU kernel does several times faster than along a last axis of only N_k elements.
        key_matrix = torch.matmul(k * scale, w_q).transpose(1, 2).reshape(b, -1, x_q.shape[-1])  # (B, Nk·H, C)
        key_bias = torch.matmul(k * scale, b_q[:, :, None]).transpose(1, 2).reshape(b, 1, -1)
        logits = torch.baddbmm(key_bias, x_q, key_matrix.transpose(1, 2))  # (B, Nq, Nk·H)
        probs = logits.reshape(b, n_q, n_k, self.num_heads).softmax(dim=-2).reshape(b, n_q, -1)
        w_o = self.out_proj.weight.reshape(self.out_proj.out_features, self.num_heads, -1).permute(1, 2, 0)  # (H, d, C)
        values_out = torch.matmul(v, w_o).transpose(1, 2).reshape(b, -1, self.out_proj.out_features)  # (B, Nk·H, C)
        return torch.baddbmm(self.out_proj.bias.expand(b, 1, -1), probs, values_out)

    def _few_queries(self, x_q: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor) -> torch.Tensor:
        """Few queries, many keys: fold k_proj into the queries and v_proj after the weighted sum.

        logits_h = q_h (x_k W_khᵀ + b_kh)ᵀ/√d = (q_h W_kh) x_kᵀ/√d + q_h b_khᵀ/√d, and since each row of P_h
        sums to 1, P_h (x_v W_vhᵀ + b_vh) = (P_h x_v) W_vhᵀ + b_vh.
        """
        b, n_q, _ = x_q.shape
        scale = (self.internal_dim // self.num_heads) ** -0.5
        q = self._split_heads(self.q_proj(x_q))  # (B, H, Nq, d)
        w_k, b_k = self._per_head(self.k_proj)
        query_matrix = torch.matmul(q * scale, w_k).reshape(b, -1, x_k.shape[-1])  # (B, H·Nq, C)
        query_bias = torch.matmul(q * scale, b_k[:, :, None]).reshape(b, -1, 1)
        probs = torch.baddbmm(query_bias, query_matrix, x_k.transpose(1, 2)).softmax(dim=-1)  # (B, H·Nq, Nk)
        pooled = torch.bmm(probs, x_v).reshape(b, self.num_heads, n_q, -1)  # (B, H, Nq, C)
        w_v, b_v = self._per_head(self.v_proj)
        out = torch.matmul(pooled, w_v.transpose(1, 2)) + b_v[None, :, None, :]  # (B, H, Nq, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, n_q, -1))


class TwoWayAttentionBlock3D(nn.Module):
    """Self-attn on tokens → token→image cross-attn → MLP → image→token cross-attn, each with a LayerNorm."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int,
                 skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """Keys: layers.{i}.*, final_attn_token_to_image.*, norm_final_attn.*."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(embedding_dim, num_heads, mlp_dim, attention_downsample_rate,
                                   skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding, image_pe (B, C, X, Y, Z); point_embedding (B, T, C) → tokens (B,T,C), image (B,XYZ,C)."""
        # Contiguous (B, XYZ, C) copies: every later add and projection then runs on dense memory
        # (a transposed view made each elementwise op ~10× slower on CPU).
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
