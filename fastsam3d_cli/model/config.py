"""Model configuration and the named presets — the one place where architecture numbers live.

`sam-med3d` is the published SAM-Med3D teacher; `fastsam3d` is the FastSAM3D student exactly as released
(width 768, 6 heads, 6 blocks, blocks 0–1 attention-free, FastSAM3D's block that applies norm2 to the
residual stream); `fastsam3d-tiny` is a true ViT-Tiny student (width 192) for fast CPU use. All three share
the same prompt encoder and mask decoder. See reference/models.md §1. `fastsam3d-tiny-refine` is
`fastsam3d-tiny` plus a refine head (model/refine_head.py) for models that correct the classical prior.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from fastsam3d_cli.errors import UsageError

BlockStyle = Literal["pre_norm", "fastsam3d"]
RelPosLayout = Literal["published", "standard"]


@dataclass(frozen=True)
class EncoderConfig:
    """3D ViT image encoder: 128³ volume → 8³ tokens → `out_chans`×8³ embedding."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    out_chans: int = 384
    qkv_bias: bool = True
    use_rel_pos: bool = True
    # Windowed blocks attend inside `window_size`³ windows (the token grid is zero-padded up to a
    # multiple of it); blocks listed in `global_attn_indexes` attend globally. 0 = all global.
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    # The first `attention_free_blocks` blocks have no attention (FastSAM3D's skip_layer).
    attention_free_blocks: int = 0
    # "pre_norm": x += attn(norm1 x); x += mlp(norm2 x).  "fastsam3d": x += attn(norm1 x); x = norm2 x; x += mlp(x).
    block_style: BlockStyle = "pre_norm"
    # "published": both released encoders add the per-axis relative-position terms with 2D indexing,
    # one dimension short (see model/attention.py); their weights were trained so, parity needs it.
    # "standard": the intended MViTv2 form, for models trained here.
    rel_pos_layout: RelPosLayout = "published"
    norm_eps: float = 1e-6

    @property
    def grid_size(self) -> int:
        """Tokens per axis (8 for 128³ input and 16³ patches)."""
        return self.img_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def block_window_size(self, index: int) -> int:
        """Window size of block `index` (0 = global attention)."""
        if self.window_size <= 0 or index in self.global_attn_indexes:
            return 0
        return self.window_size

    def block_has_attention(self, index: int) -> bool:
        return index >= self.attention_free_blocks


@dataclass(frozen=True)
class ModelConfig:
    """A whole Sam3D model: image encoder + 3D prompt encoder + 3D mask decoder."""

    name: str
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    decoder_attention_downsample: int = 2
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # Widths of the refine head's three levels (model/refine_head.py); () = a model without one. Only models
    # that correct the classical prior use it (interactive/prior.py).
    refine_head_widths: tuple[int, ...] = ()

    @property
    def image_size(self) -> int:
        return self.encoder.img_size

    @property
    def embedding_size(self) -> int:
        return self.encoder.grid_size

    @property
    def low_res_size(self) -> int:
        """Side of the low-res logits (4× the embedding grid: 32 for 128³ input)."""
        return self.encoder.grid_size * 4

    def to_dict(self) -> dict:
        data = asdict(self)
        data["encoder"]["global_attn_indexes"] = list(self.encoder.global_attn_indexes)
        data["refine_head_widths"] = list(self.refine_head_widths)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        encoder = dict(data.get("encoder", {}))
        if "global_attn_indexes" in encoder:
            encoder["global_attn_indexes"] = tuple(encoder["global_attn_indexes"])
        rest = {k: v for k, v in data.items() if k != "encoder"}
        if "refine_head_widths" in rest:
            rest["refine_head_widths"] = tuple(int(w) for w in rest["refine_head_widths"])
        return cls(encoder=EncoderConfig(**encoder), **rest)


def _sam_med3d() -> ModelConfig:
    return ModelConfig(name="sam-med3d", encoder=EncoderConfig(
        embed_dim=768, depth=12, num_heads=12, window_size=14, global_attn_indexes=(2, 5, 8, 11)))


def _fastsam3d() -> ModelConfig:
    return ModelConfig(name="fastsam3d", encoder=EncoderConfig(
        embed_dim=768, depth=6, num_heads=6, window_size=0, global_attn_indexes=(),
        attention_free_blocks=2, block_style="fastsam3d"))


def _fastsam3d_tiny() -> ModelConfig:
    return ModelConfig(name="fastsam3d-tiny", encoder=EncoderConfig(
        embed_dim=192, depth=6, num_heads=3, window_size=0, global_attn_indexes=(), rel_pos_layout="standard"))


def _fastsam3d_tiny_refine() -> ModelConfig:
    return replace(_fastsam3d_tiny(), name="fastsam3d-tiny-refine", refine_head_widths=(8, 16, 32))


PRESETS: dict[str, ModelConfig] = {
    "sam-med3d": _sam_med3d(),
    "fastsam3d": _fastsam3d(),
    "fastsam3d-tiny": _fastsam3d_tiny(),
    "fastsam3d-tiny-refine": _fastsam3d_tiny_refine(),
}
PRESET_NAMES = tuple(PRESETS)


def get_config(name: str) -> ModelConfig:
    """The preset called `name` (UsageError listing the valid names otherwise)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown model '{name}'", f"choose one of: {', '.join(PRESET_NAMES)}") from None


def with_overrides(config: ModelConfig, **encoder_overrides) -> ModelConfig:
    """A copy of `config` with some encoder fields changed (for tests and experiments)."""
    return replace(config, encoder=replace(config.encoder, **encoder_overrides))
