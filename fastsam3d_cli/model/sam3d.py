"""Sam3D: owns the image encoder, prompt encoder and mask decoder, and exposes the interactive API.

    model = build_model("fastsam3d")
    embedding = model.encode(volume)                          # once per 128³ crop
    low_res, iou = model.decode(embedding, points, labels, mask_logits=previous_low_res)   # per click
    mask = model.upsample_logits(low_res) > 0                 # 128³ logits → binary

(The reference `Sam3D.forward` is broken for 3D — it calls bilinear interpolation on 5-D tensors — so
there is no batched `forward` here; the three steps above are what every real pipeline runs.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastsam3d_cli.model.attention import EncoderAttention, resolve_backend
from fastsam3d_cli.model.config import ModelConfig, get_config
from fastsam3d_cli.model.cpu_runtime import tune_cpu_for_inference
from fastsam3d_cli.model.image_encoder import ImageEncoderViT3D
from fastsam3d_cli.model.mask_decoder import MaskDecoder3D
from fastsam3d_cli.model.prompt_encoder import PromptEncoder3D
from fastsam3d_cli.model.refine_head import RefineHead
from fastsam3d_cli.model.transformer import TwoWayTransformer3D


class Sam3D(nn.Module):
    """The whole model. State-dict keys: image_encoder.*, prompt_encoder.*, mask_decoder.* (and refine_head.* when
    the config asks for one: the classical prior's full-resolution correction, interactive/refine.py)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoderViT3D(config.encoder)
        self.prompt_encoder = PromptEncoder3D(config.prompt_embed_dim, config.embedding_size, config.image_size,
                                              config.mask_in_chans)
        transformer = TwoWayTransformer3D(config.decoder_depth, config.prompt_embed_dim, config.decoder_num_heads,
                                          config.decoder_mlp_dim, config.decoder_attention_downsample)
        self.mask_decoder = MaskDecoder3D(config.prompt_embed_dim, transformer, config.num_multimask_outputs,
                                          config.iou_head_depth, config.iou_head_hidden_dim)
        self.refine_head = RefineHead(config.refine_head_widths) if config.refine_head_widths else None
        self.attention = "exact"
        self.set_attention("exact")

    # ------------------------------------------------------------------------------ configuration
    def set_attention(self, backend: str, device: torch.device | None = None) -> str:
        """Choose the encoder attention backend (auto|exact|sdpa|flash|sparse); returns the resolved name."""
        if device is None:
            device = next(self.parameters()).device
        resolved = resolve_backend(backend, device,
                                   flash_supported=self.config.encoder.rel_pos_layout == "standard")
        for module in self.image_encoder.modules():
            if isinstance(module, EncoderAttention):
                module.backend = resolved
        self.attention = resolved
        return resolved

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the weights; inputs are cast to it (float32, or bfloat16/float16 for speed)."""
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------------------ the API
    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """Image embedding (B, 384, 8, 8, 8) of z-normalised crops `volume` (B, 1, 128, 128, 128)."""
        size = self.config.image_size
        if volume.ndim != 5 or volume.shape[1] != 1 or tuple(volume.shape[2:]) != (size,) * 3:
            raise ValueError(f"volume must be (B, 1, {size}, {size}, {size}); got {tuple(volume.shape)}")
        return self.image_encoder(volume.to(self.dtype))

    def decode(self, embedding: torch.Tensor, points: torch.Tensor | None, point_labels: torch.Tensor | None,
               mask_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, 1, 32, 32, 32) and predicted IoU (B, 1) for one decoder step.

        embedding: (B, 384, 8, 8, 8) from `encode`.
        points: (B, N, 3) float voxel indices in the 128³ crop, axis order of the crop tensor
            (axis 0, axis 1, axis 2); point_labels: (B, N), 1 = include, 0 = exclude. Both None for a
            mask-only step.
        mask_logits: the previous step's low-res logits (B, 1, 32, 32, 32); None uses the learned
            "no mask" embedding (the published training loops pass zeros on the first click instead).
        """
        if (points is None) != (point_labels is None):
            raise ValueError("points and point_labels must be given together")
        if points is not None:
            if points.ndim != 3 or points.shape[-1] != 3 or point_labels.shape != points.shape[:2]:
                raise ValueError(f"points must be (B, N, 3) and labels (B, N); got {tuple(points.shape)}, "
                                 f"{tuple(point_labels.shape)}")
        prompt = None if points is None else (points, point_labels)
        if mask_logits is not None:
            mask_logits = mask_logits.to(self.dtype)
        sparse, dense = self.prompt_encoder(prompt, mask_logits, batch_size=embedding.shape[0])
        return self.mask_decoder(embedding.to(self.dtype), self.prompt_encoder.get_dense_pe(), sparse, dense,
                                 multimask_output=False)

    def upsample_logits(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32, 32) → (B, 1, 128, 128, 128) logits, trilinear with align_corners=False."""
        size = self.config.image_size
        return F.interpolate(low_res_logits, size=(size,) * 3, mode="trilinear", align_corners=False)


def build_model(preset: str | ModelConfig = "fastsam3d", attention: str = "exact",
                device: torch.device | str | None = None) -> Sam3D:
    """A randomly initialised Sam3D for a preset name or config, on `device`, with `attention` resolved."""
    config = get_config(preset) if isinstance(preset, str) else preset
    model = Sam3D(config)
    if device is not None:
        model = model.to(device)
    tune_cpu_for_inference(device)
    model.set_attention(attention)
    return model.eval()
