"""Multi-head self-attention of the 3D ViT encoder, with decomposed relative position and several backends.

Relative-position layouts
-------------------------
Both published encoders (SAM-Med3D and FastSAM3D) add their three per-axis relative-position terms to the
(B, qd, qh, qw, kd, kh, kw) logits with the indexing written for 2D, one dimension short. On cubic grids
(the only ones where it runs) the bias of query (qd, qh, qw) towards key (kd, kh, kw) is therefore

    A + Hh + Ww = q(qd,qh,qw)·Td[qd, kw] + q(qd,qh,kd)·Th[qh, kw] + q(qd,qh,kh)·Tw[kh, kw]

(T* = per-axis tables gathered by relative position; q(·) = the query at that grid position). The weights
were trained with this, so the `published` layout reproduces it. `standard` is the intended MViTv2 form
q·Td[qd,kd] + q·Th[qh,kh] + q·Tw[qw,kw], used by models trained here (fastsam3d-tiny).

Backends (chosen per model with `Sam3D.set_attention`)
------------------------------------------------------
* ``exact``  — the reference arithmetic: explicit attention matrix; windowed blocks over the zero-padded
  14³ window (2744 tokens), like the original.
* ``sdpa``   — ``torch.nn.functional.scaled_dot_product_attention`` with the bias as an additive mask.
  Windowed blocks whose grid fits in one window use the *factorised padded window* (below). Same outputs
  as ``exact`` within float rounding.
* ``flash``  — flash-attn kernels (CUDA, fp16/bf16), `standard` layout only: the separable bias is folded
  into augmented query/key vectors (`fold_bias`). Exact formula, computed in half precision.
* ``sparse`` — the paper's 3D sparse (dilated) attention for global blocks: segments of `SPARSE_SEGMENT`
  flat tokens, split by flat index mod `SPARSE_DILATION` into groups that attend only within themselves
  (with the matching bias). APPROXIMATE: only meaningful for models trained with it. Unlike the original,
  every output goes back to its own token position.
* ``auto``   — the fastest exact backend for the device: ``flash`` on CUDA when installed and supported by
  the model's layout, else ``sdpa``.

Factorised padded window (why ``sdpa`` is fast for SAM-Med3D's windowed blocks)
-------------------------------------------------------------------------------
The teacher zero-pads the 8³ token grid to one 14³ window without masking. Padded tokens are zero after
norm1, so every padded key is the key bias k_b, every padded value is v_b and every padded query is q_b.
For a real query the padded keys contribute exp(scale·q·k_b) · Σ_{k padded} exp(bias(q, k)); with the
published layout that sum is, per kw, a product of a sum over kd (of e^Hh) and a sum over kh (of e^Ww), and
the padded set {(kd,kh,kw)} ∉ [0,8)³ splits into a few such products. The window is therefore exactly
attention over the 512 real keys plus ONE virtual key (k_b, v_b) whose logit carries log(padded mass).
Padded queries are cropped by the reference, so they are never computed.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fastsam3d_cli.errors import DeviceError, UsageError
from fastsam3d_cli.model.common import Linear

AttentionBackend = Literal["auto", "exact", "sdpa", "flash", "sparse"]
BACKENDS: tuple[str, ...] = ("auto", "exact", "sdpa", "flash", "sparse")
EXACT_BACKENDS: tuple[str, ...] = ("exact", "sdpa")  # match the reference within float32 rounding
SPARSE_SEGMENT = 512  # flat tokens per segment (the whole 8³ grid)
SPARSE_DILATION = 8  # group = tokens of one segment with equal flat index mod 8 (64 tokens each)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         scale: float | None = None) -> torch.Tensor:
    """scaled_dot_product_attention on (BH, N, hd) tensors, passed as 4-D so CPU takes the fused kernel.

    With 3-D inputs torch falls back to the unfused math path on CPU (several times slower per call).
    """
    out = F.scaled_dot_product_attention(q[None], k[None], v[None],
                                         attn_mask=None if mask is None else mask[None], scale=scale)
    return out[0]


# --------------------------------------------------------------------------------- relative position
def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) position pair along one axis.

    rel_pos: (L, C) table. Returns (q_size, k_size, C); the table is linearly resized when its length is not
    2·max(q_size, k_size) − 1 (as in SAM / MViTv2).
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                                size=max_rel_dist, mode="linear")
        resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        resized = rel_pos
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return resized[relative.long()]


def rel_pos_terms(q: torch.Tensor, grid: tuple[int, int, int],
                  tables: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis terms rel_d, rel_h, rel_w, each (BH, D, H, W, K_axis), for unscaled q (BH, D·H·W, hd)."""
    d, h, w = grid
    r_q = q.reshape(q.shape[0], d, h, w, q.shape[-1])
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, get_rel_pos(d, d, tables[0]))
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, get_rel_pos(h, h, tables[1]))
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, get_rel_pos(w, w, tables[2]))
    return rel_d, rel_h, rel_w


def add_rel_pos(logits: torch.Tensor, rel: tuple[torch.Tensor, ...], layout: str) -> torch.Tensor:
    """logits (BH, N, N) + the bias from `rel_pos_terms`, in the given layout (reference arithmetic)."""
    rel_d, rel_h, rel_w = rel
    bh, d, h, w = rel_d.shape[:4]
    logits = logits.view(bh, d, h, w, d, h, w)
    if layout == "published":
        logits = logits + rel_d[:, :, :, :, None, None] + rel_h[:, :, :, None, :, None] + rel_w[:, :, :, None, None, :]
    else:
        logits = (logits + rel_d[:, :, :, :, :, None, None] + rel_h[:, :, :, :, None, :, None]
                  + rel_w[:, :, :, :, None, None, :])
    return logits.view(bh, d * h * w, d * h * w)


def rel_pos_bias(q: torch.Tensor, grid: tuple[int, int, int], tables: tuple[torch.Tensor, ...],
                 layout: str) -> torch.Tensor:
    """(BH, N, N) additive relative-position bias for global attention over `grid`.

    Same values as `add_rel_pos` on zero logits, but the two smaller terms are summed first so only one
    full-size addition is made.
    """
    rel_d, rel_h, rel_w = rel_pos_terms(q, grid, tables)
    bh, d, h, w = rel_d.shape[:4]
    if layout == "published":
        bias = rel_d[:, :, :, :, None, None] + (rel_h[:, :, :, None, :, None] + rel_w[:, :, :, None, None, :])
    else:
        bias = rel_d[:, :, :, :, :, None, None] + (rel_h[:, :, :, :, None, :, None] + rel_w[:, :, :, :, None, None, :])
    return bias.reshape(bh, d * h * w, d * h * w)


# ---------------------------------------------------------------------------------------- the module
class EncoderAttention(nn.Module):
    """Multi-head attention over a 3D token grid (keys `qkv`, `proj`, `rel_pos_d/h/w`).

    `rel_pos_size` is the grid side the tables are sized for: the window size for windowed blocks (27 rows
    for 14), the token grid for global blocks (15 rows for 8). `rel_pos_layout`: "published" | "standard".
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool, rel_pos_size: int,
                 rel_pos_layout: str = "published") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        self.rel_pos_layout = rel_pos_layout
        if use_rel_pos:
            rows = 2 * rel_pos_size - 1
            self.rel_pos_d = nn.Parameter(torch.zeros(rows, self.head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(rows, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(rows, self.head_dim))
        self.backend: str = "exact"

    # ----------------------------------------------------------------------------- shared pieces
    def _split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, C) → q, k, v each (B·heads, N, head_dim), in the reference's memory layout."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, -1).unbind(0)
        return q, k, v

    def _merge_heads(self, out: torch.Tensor, b: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B·heads, N, hd) → (B, D, H, W, C) followed by the output projection."""
        d, h, w = grid
        out = out.view(b, self.num_heads, d, h, w, -1).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, -1)
        return self.proj(out)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rel_pos_d, self.rel_pos_h, self.rel_pos_w

    def _bias(self, q: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor | None:
        if not self.use_rel_pos:
            return None
        return rel_pos_bias(q, grid, self._tables(), self.rel_pos_layout).to(q.dtype)

    # --------------------------------------------------------------------------------- global
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over every token of the grid. x: (B, D, H, W, C) → same shape."""
        b, d, h, w, c = x.shape
        grid = (d, h, w)
        q, k, v = self._split_qkv(x.reshape(b, d * h * w, c))
        if self.backend == "exact":
            out = self._exact(q, k, v, grid)
        elif self.backend == "sdpa":
            out = sdpa(q, k, v, self._bias(q, grid))
        elif self.backend == "flash":
            out = self._flash(q, k, v, grid)
        elif self.backend == "sparse":
            out = self._sparse(q, k, v, grid)
        else:
            raise UsageError(f"attention backend '{self.backend}' is not resolved", "call Sam3D.set_attention first")
        return self._merge_heads(out, b, grid)

    def _exact(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Reference arithmetic: explicit attention matrix, bias added per axis after q·kᵀ·scale."""
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_rel_pos(attn, rel_pos_terms(q, grid, self._tables()), self.rel_pos_layout)
        return attn.softmax(dim=-1) @ v

    # ----------------------------------------------------------------- padded single window
    def supports_padded_window(self) -> bool:
        """True when `forward_padded_window` applies (published layout with rel-pos, non-exact backend)."""
        return self.use_rel_pos and self.rel_pos_layout == "published" and self.backend in ("sdpa", "sparse")

    def forward_padded_window(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """Exact result, for the real tokens, of attention over `x` zero-padded to one `window`³ window.

        x: (B, n, n, n, C) with n < window, already normalised (the reference pads after norm1). Equivalent
        to the reference's pad → attend over window³ tokens → crop, without computing padded tokens.
        """
        b, d, h, w, c = x.shape
        if not (d == h == w < window):
            raise ValueError(f"the factorised padded window needs a cubic grid smaller than {window}")
        n = d
        q, k, v = self._split_qkv(x.reshape(b, n ** 3, c))
        q_pad, k_pad, v_pad = self._zero_token_qkv(b, q)
        real_bias, log_pad = published_window_bias(q, q_pad, n, window, self._tables())
        keys = torch.cat([k, k_pad], dim=1)
        values = torch.cat([v, v_pad], dim=1)
        bias = torch.cat([real_bias, log_pad[..., None]], dim=-1).to(q.dtype)
        out = sdpa(q, keys, values, bias)
        return self._merge_heads(out, b, (n, n, n))

    def _zero_token_qkv(self, b: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of a zero input token (the qkv bias), as (B·heads, 1, hd) each."""
        if self.qkv.bias is None:
            zero = q.new_zeros(q.shape[0], 1, self.head_dim)
            return zero, zero, zero
        parts = self.qkv.bias.to(q.dtype).reshape(3, 1, self.num_heads, 1, self.head_dim).expand(-1, b, -1, -1, -1)
        q_b, k_b, v_b = parts.reshape(3, b * self.num_heads, 1, self.head_dim).unbind(0)
        return q_b, k_b, v_b

    # ------------------------------------------------------------------------------ flash
    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        if not self.use_rel_pos:
            return _flash_attention(q, k, v, self.scale)
        if self.rel_pos_layout != "standard":
            raise UsageError("the flash backend cannot fold the published models' relative-position layout",
                             "use --attention sdpa (auto picks it for these models)")
        rel = rel_pos_terms(q, grid, self._tables())
        q_extra = torch.cat([t.reshape(q.shape[0], q.shape[1], -1) for t in rel], dim=-1)
        return _flash_attention(q, k, v, self.scale, q_extra, axis_one_hot(grid, q.device, q.dtype))

    # ------------------------------------------------------------------------------ sparse
    def _sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Dilated-segment attention: each token attends only within its group (see module docstring)."""
        groups = sparse_groups(q.shape[1], SPARSE_SEGMENT, SPARSE_DILATION, q.device)  # (G, m) flat indices
        qg, kg, vg = q[:, groups], k[:, groups], v[:, groups]  # (BH, G, m, hd)
        bias = self._bias(q, grid)  # (BH, N, N); cheap at N = 512
        mask = None if bias is None else bias[:, groups[:, :, None], groups[:, None, :]]
        out = torch.empty_like(q)
        out[:, groups] = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)
        return out


def published_window_bias(q: torch.Tensor, q_pad: torch.Tensor, n: int, window: int,
                          tables: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Published-layout bias inside one zero-padded `window`³ window, for the n³ real queries.

    q: (BH, n³, hd) real queries; q_pad: (BH, 1, hd) the query of a padded (zero) token.
    Returns real_bias (BH, n³, n³) towards the real keys and log_pad (BH, n³) = log Σ_{padded k} e^{bias(q,k)}.
    With A[q, kw] = q·Td[qd,kw], Hh[qd,qh,x,kw] = q(qd,qh,x)·Th[qh,kw] and Ww[qd,qh,x,kw] = q(qd,qh,x)·Tw[x,kw]
    (q(qd,qh,x) = q_pad for x ≥ n): bias = A[q,kw] + Hh[qd,qh,kd,kw] + Ww[qd,qh,kh,kw].
    """
    s = window
    bh, hd = q.shape[0], q.shape[-1]
    r_q = q.reshape(bh, n, n, n, hd)
    td = get_rel_pos(s, s, tables[0])[:n]  # (n, s, hd): rows for real qd, all kw
    th = get_rel_pos(s, s, tables[1])[:n]
    tw = get_rel_pos(s, s, tables[2])  # (s, s, hd): rows for every x (real and padded)
    q_ext = torch.cat([r_q, q_pad.reshape(bh, 1, 1, 1, hd).expand(bh, n, n, s - n, hd)], dim=3)  # (BH,n,n,s,hd)
    a = torch.einsum("bdhwc,dkc->bdhwk", r_q, td)  # (BH, n, n, n, s)
    hh = torch.einsum("bdhxc,hkc->bdhxk", q_ext, th)  # (BH, n, n, s, s)
    ww = torch.einsum("bdhxc,xkc->bdhxk", q_ext, tw)  # (BH, n, n, s, s)

    real_bias = (a[:, :, :, :, None, None, :n] + hh[:, :, :, None, :n, None, :n]
                 + ww[:, :, :, None, None, :n, :n]).reshape(bh, n ** 3, n ** 3)

    def log_sums(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo = torch.logsumexp(t[:, :, :, :n], dim=3)  # over real x, (BH, n, n, s[kw])
        hi = torch.logsumexp(t[:, :, :, n:], dim=3)  # over padded x
        return lo, hi, torch.logaddexp(lo, hi)

    h_lo, h_hi, h_all = log_sums(hh)
    w_lo, w_hi, w_all = log_sums(ww)
    # For kw < n a key is padded iff kd ≥ n or kh ≥ n; for kw ≥ n every (kd, kh) is padded.
    mass_kw_real = torch.logaddexp(h_hi + w_all, h_lo + w_hi)[..., :n]
    mass_kw_pad = (h_all + w_all)[..., n:]
    log_mass = torch.cat([mass_kw_real, mass_kw_pad], dim=-1)  # (BH, n, n, s)
    log_pad = torch.logsumexp(a + log_mass[:, :, :, None, :], dim=-1)  # (BH, n, n, n)
    return real_bias, log_pad.reshape(bh, n ** 3)


def sparse_groups(n_tokens: int, segment: int, dilation: int, device: torch.device) -> torch.Tensor:
    """(G, m) flat token indices: segments of `segment` consecutive tokens, split by index mod `dilation`."""
    segment = min(segment, n_tokens)
    if n_tokens % segment or segment % dilation:
        raise UsageError(f"sparse attention needs {n_tokens} tokens divisible into segments of {segment} "
                         f"and dilation {dilation}", "use the default 128³ input")
    idx = torch.arange(n_tokens, device=device).reshape(n_tokens // segment, segment // dilation, dilation)
    return idx.permute(0, 2, 1).reshape(-1, segment // dilation)


# ------------------------------------------------------------------------------------ flash-attn
def axis_one_hot(grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(D·H·W, D+H+W) per-key features: one-hot of each axis coordinate (for bias folding)."""
    coords = torch.stack(torch.unravel_index(torch.arange(grid[0] * grid[1] * grid[2], device=device), grid), -1)
    return torch.cat([F.one_hot(coords[:, axis], grid[axis]) for axis in range(3)], dim=-1).to(dtype)


def fold_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_extra: torch.Tensor | None = None,
              k_extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augmented (q', k', v') with q'·k' = q·k·scale + q_extra·k_extra, widths padded to a multiple of 8.

    The standard decomposed relative position is separable: with q_extra = [rel_d(q,·), rel_h(q,·), rel_w(q,·)]
    and k_extra = [one-hot(k_d), one-hot(k_h), one-hot(k_w)] the extra product is exactly the bias. So a
    kernel without bias support (flash-attn) run with softmax scale 1 computes biased attention.
    q, k, v: (BH, N, hd); q_extra: (BH, Nq, E); k_extra: (Nk, E). v is zero-padded to the same width.
    """
    qa, ka = q * scale, k
    if q_extra is not None and k_extra is not None:
        qa = torch.cat([qa, q_extra.to(q.dtype)], dim=-1)
        ka = torch.cat([ka, k_extra.to(k.dtype).expand(k.shape[0], -1, -1)], dim=-1)
    width = -(-qa.shape[-1] // 8) * 8
    return tuple(F.pad(t, (0, width - t.shape[-1])) for t in (qa, ka, v))  # type: ignore[return-value]


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     q_extra: torch.Tensor | None = None, k_extra: torch.Tensor | None = None) -> torch.Tensor:
    """flash-attn over (BH, N, hd) tensors with an optional separable bias (see `fold_bias`)."""
    flash_fn = load_flash_attn()
    if not q.is_cuda:
        raise DeviceError("the flash attention backend needs a CUDA device", "use --attention sdpa on CPU")
    qa, ka, va = fold_bias(q, k, v, scale, q_extra, k_extra)
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    # flash-attn layout: (batch, seqlen, heads, dim); one "head" per (batch·head) row.
    out = flash_fn(qa.to(dtype)[:, :, None], ka.to(dtype)[:, :, None], va.to(dtype)[:, :, None], softmax_scale=1.0)
    return out[:, :, 0, :v.shape[-1]].to(q.dtype)


def load_flash_attn():
    """Return flash_attn.flash_attn_func, or raise a clear error when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - ImportError or a broken CUDA build
        raise DeviceError("the flash attention backend needs the flash-attn package",
                          "pip install 'fastsam3d-cli[flash]' on a CUDA machine, or use --attention sdpa") from None
    return flash_attn_func


def flash_attn_usable(device: torch.device) -> bool:
    """True when flash-attn is importable and `device` is CUDA (what `auto` checks)."""
    if device.type != "cuda":
        return False
    try:
        load_flash_attn()
    except DeviceError:
        return False
    return True


def resolve_backend(name: str, device: torch.device, flash_supported: bool = True) -> str:
    """Turn `auto` into a concrete backend and check that the requested one can run on `device`.

    `flash_supported` is False for models whose relative-position bias cannot be folded (published layout).
    """
    if name not in BACKENDS:
        raise UsageError(f"unknown attention backend '{name}'", f"choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        return "flash" if flash_supported and flash_attn_usable(device) else "sdpa"
    if name == "flash" and not flash_supported:
        raise UsageError("the flash backend cannot fold the published models' relative-position layout",
                         "use --attention sdpa or auto")
    if name == "flash":
        load_flash_attn()
        if device.type != "cuda":
            raise DeviceError("the flash attention backend needs a CUDA device", "use --attention sdpa (or auto) on CPU")
    return name
