"""Building blocks of LLV-FSR: windowed transformer blocks, prior encoders, and the LVPFB.

LLV-FSR (Wang et al., arXiv 2411.09293) publishes no code; everything here beyond the paper's block
diagram is a documented reading of it. Feature maps are ``[B,C,H,W]``; text features are
:class:`TextFeatures` (tokens already projected to the feature width C).

Choices worth knowing:

- Basic block = two Swin-style transformer blocks over non-overlapping ``window x window`` windows,
  the second with the windows shifted by half a window (masked so wrapped-around or padded pixels
  never meet). Cost is linear in pixels and the pair sees across window borders. No relative
  position bias: the feed-forward net has a 3x3 depthwise conv (Restormer's gated FFN), which gives
  the tokens their position.
- Missing priors: a branch whose prior is absent outputs zeros (per sample, through ``keep``), so
  the fusion conv sees exactly what a model without that branch sees; nothing learned stands in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

PRIOR_NAMES = ("mask", "depth", "caption", "description")
SPATIAL_PRIORS = ("mask", "depth")
TEXT_PRIORS = ("caption", "description")
DESA_MODES = ("text_query", "image_query")


@dataclass
class TextFeatures:
    """Projected text: tokens ``[B,T,C]``, ``valid`` ``[B,T]`` bool, a pooled vector ``[B,C]``."""

    tokens: torch.Tensor
    valid: torch.Tensor
    pooled: torch.Tensor


# name -> (feature map [B,C,H,W] or TextFeatures, keep [B] float in {0,1})
EncodedPriors = dict[str, tuple[object, torch.Tensor]]


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B,C,H,W]`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@lru_cache(maxsize=32)
def _window_mask(hp: int, wp: int, h: int, w: int, ws: int, shift: int) -> torch.Tensor | None:
    """Which token pairs of each window may attend: ``[nW,1,N,N]`` bool, or None when all may."""
    rows = torch.arange(hp).view(-1, 1).expand(hp, wp)
    cols = torch.arange(wp).view(1, -1).expand(hp, wp)
    # Pixels that the cyclic shift wraps from the top/left edge get their own label, padding gets -1.
    ids = (rows < shift).long() * 2 + (cols < shift).long()
    ids = torch.where((rows >= h) | (cols >= w), torch.full_like(ids, -1), ids)
    if shift:
        ids = torch.roll(ids, shifts=(-shift, -shift), dims=(0, 1))
    win = ids.view(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    mask = win[:, :, None] == win[:, None, :]
    return None if bool(mask.all()) else mask.unsqueeze(1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (optionally shifted) windows, via SDPA."""

    def __init__(self, dim: int, heads: int, window: int, shifted: bool):
        super().__init__()
        self.heads, self.window, self.shifted = heads, window, shifted
        self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = min(self.window, h, w)
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        # A single window already sees everything; shifting it would only add masking.
        shift = ws // 2 if self.shifted and (hp > ws or wp > ws) else 0
        qkv = F.pad(self.qkv(x), (0, wp - w, 0, hp - h))
        if shift:
            qkv = torch.roll(qkv, shifts=(-shift, -shift), dims=(2, 3))
        nh, nw, d = hp // ws, wp // ws, c // self.heads
        qkv = qkv.view(b, 3, self.heads, d, nh, ws, nw, ws).permute(1, 0, 4, 6, 2, 5, 7, 3)
        # 4-D [B*nW, heads, N, d]: the fused SDPA kernels (flash, memory-efficient) only take 4-D input.
        q, k, v = qkv.reshape(3, b * nh * nw, self.heads, ws * ws, d).unbind(0)
        mask = _window_mask(hp, wp, h, w, ws, shift)
        if mask is not None:
            mask = mask.to(x.device).expand(b, -1, -1, -1, -1).reshape(b * nh * nw, 1, ws * ws, ws * ws)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.view(b, nh, nw, self.heads, ws, ws, d).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, hp, wp)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(2, 3))
        return self.proj(out[:, :, :h, :w])


class GatedFFN(nn.Module):
    """Feed-forward net with a 3x3 depthwise conv and a GELU gate (Restormer's GDFN)."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.expand = nn.Conv2d(dim, hidden * 2, 1)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2)
        self.shrink = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.dwconv(self.expand(x)).chunk(2, dim=1)
        return self.shrink(F.gelu(a) * g)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + WindowAttention(LN(x)), then x + GatedFFN(LN(x))."""

    def __init__(self, dim: int, heads: int, window: int, shifted: bool, mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.attn = WindowAttention(dim, heads, window, shifted)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = GatedFFN(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class BasicBlock(nn.Sequential):
    """Two transformer blocks: regular windows, then windows shifted by half a window.

    With ``conv`` a 3x3 conv closes the block around a skip, ``x + conv(blocks(x))`` (SwinIR's
    residual group); the convolution's local bias speeds up learning on small CPU budgets.
    """

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float, conv: bool = False):
        layers = [
            TransformerBlock(dim, heads, window, False, mlp_ratio),
            TransformerBlock(dim, heads, window, True, mlp_ratio),
        ]
        if conv:
            layers.append(nn.Conv2d(dim, dim, 3, padding=1))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[1](self[0](x))
        return x + self[2](y) if len(self) > 2 else y


class SpatialPriorEncoder(nn.Sequential):
    """F_S / F_D: two 3x3 convs from the prior's channels (K for the mask, 1 for depth) to C."""

    def __init__(self, in_channels: int, dim: int):
        mid = max(8, dim // 2)
        super().__init__(nn.Conv2d(in_channels, mid, 3, padding=1), _act(), nn.Conv2d(mid, dim, 3, padding=1))


class TextProjector(nn.Module):
    """E_C / E_D: LayerNorm then a linear map from the text encoder's width D to C."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)
        self.linear = nn.Linear(text_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class StructureAttention(nn.Module):
    """SegA / DepA: cascaded convs over [F, F_prior] -> sigmoid spatial map ``[B,1,H,W]`` -> F * map.

    One map per pixel, shared by all channels (a spatial attention in the CBAM sense): the prior says
    *where* to look, the fusion conv after the LVPFB decides what to do with the gated features.
    """

    def __init__(self, dim: int):
        super().__init__()
        mid = max(8, dim // 4)
        self.net = nn.Sequential(
            nn.Conv2d(dim * 2, mid, 1),
            _act(),
            nn.Conv2d(mid, mid, 3, padding=1),
            _act(),
            nn.Conv2d(mid, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.net(torch.cat([x, prior], dim=1)))


class CaptionAttention(nn.Module):
    """CapA: pooled caption ``[B,C]`` -> linear -> sigmoid -> per-channel weights on F."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(text.pooled))[:, :, None, None]


class DescriptionAttention(nn.Module):
    """DesA: cross-attention between description tokens and the image features (two readings).

    ``text_query`` (default, the paper's wording: queries from the description, keys/values from
    the image). Step 1: each description token reads the image, S = softmax_pixels(Q K^T) V, one
    summary per token. Step 2 brings the summaries back to the pixels with the *same* compatibility
    scores Q K^T, normalised over the tokens instead of the pixels: pixel p receives
    sum_t softmax_tokens(q_t . k_p) S_t. No new projection is introduced, so Q, K and V keep the
    roles the paper gives them, and each pixel gets the evidence of the tokens that found it
    relevant. ``image_query``: the usual text conditioning, pixels query, tokens are keys/values.
    """

    def __init__(self, dim: int, heads: int, mode: str):
        super().__init__()
        if mode not in DESA_MODES:
            raise ValueError(f"desa_mode must be one of {DESA_MODES}, got {mode!r}")
        self.heads, self.mode = heads, mode
        self.norm = LayerNorm2d(dim)
        self.q_proj = nn.Linear(dim, dim)  # description tokens (text_query) or pixels (image_query)
        self.kv_proj = nn.Linear(dim, dim * 2)  # pixels (text_query) or description tokens (image_query)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B,n,C] -> [B,heads,n,d]

    def forward(self, x: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        b, c, h, w = x.shape
        pixels = self.norm(x).flatten(2).transpose(1, 2)  # [B,N,C]
        token_mask = text.valid[:, None, None, :]  # [B,1,1,T]: padding tokens are never attended
        if self.mode == "text_query":
            q = self._split(self.q_proj(text.tokens))
            k, v = (self._split(t) for t in self.kv_proj(pixels).chunk(2, dim=-1))
            summaries = F.scaled_dot_product_attention(q, k, v)  # [B,h,T,d]
            out = F.scaled_dot_product_attention(k, q, summaries, attn_mask=token_mask)  # [B,h,N,d]
        else:
            q = self._split(self.q_proj(pixels))
            k, v = (self._split(t) for t in self.kv_proj(text.tokens).chunk(2, dim=-1))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, h * w, c))
        return out.transpose(1, 2).reshape(b, c, h, w)


def _gate(out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero a branch's output for the samples whose prior is absent or dropped."""
    return out * keep.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)


class LVPFB(nn.Module):
    """Language-Vision Prior Fusion Block: [F, SegA, DepA, CapA, DesA] -> 1x1 fusion conv -> + F.

    Only the branches of ``priors`` are built; an absent prior contributes zeros to its slot.
    """

    def __init__(self, dim: int, heads: int, priors: tuple[str, ...], desa_mode: str):
        super().__init__()
        self.priors = tuple(p for p in PRIOR_NAMES if p in priors)
        builders = {
            "mask": lambda: StructureAttention(dim),
            "depth": lambda: StructureAttention(dim),
            "caption": lambda: CaptionAttention(dim),
            "description": lambda: DescriptionAttention(dim, heads, desa_mode),
        }
        self.branches = nn.ModuleDict({p: builders[p]() for p in self.priors})
        self.fuse = nn.Conv2d(dim * (1 + len(self.priors)), dim, 1)

    def forward(self, x: torch.Tensor, priors: EncodedPriors) -> torch.Tensor:
        parts = [x]
        for name in self.priors:
            if name in priors:
                value, keep = priors[name]
                parts.append(_gate(self.branches[name](x, value), keep))
            else:
                parts.append(torch.zeros_like(x))
        return x + self.fuse(torch.cat(parts, dim=1))


class ConcatFusion(nn.Module):
    """Ablation "model2": concat [F, F_S, F_D, pooled caption, pooled description] -> convs -> + F."""

    def __init__(self, dim: int, priors: tuple[str, ...]):
        super().__init__()
        self.priors = tuple(p for p in PRIOR_NAMES if p in priors)
        self.net = nn.Sequential(
            nn.Conv2d(dim * (1 + len(self.priors)), dim, 1), _act(), nn.Conv2d(dim, dim, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, priors: EncodedPriors) -> torch.Tensor:
        parts = [x]
        for name in self.priors:
            if name not in priors:
                parts.append(torch.zeros_like(x))
                continue
            value, keep = priors[name]
            if isinstance(value, TextFeatures):  # broadcast the pooled text vector over the pixels
                value = value.pooled[:, :, None, None].expand_as(x)
            parts.append(_gate(value, keep))
        return x + self.net(torch.cat(parts, dim=1))
