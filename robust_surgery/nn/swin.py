"""torchvision's Swin attention with its ``qkv`` and ``proj`` called as modules, so converting them counts.

torchvision's ``ShiftedWindowAttention`` (and ``…V2``) hands ``self.qkv.weight`` and
``self.proj.weight`` to ``shifted_window_attention``, which calls ``F.linear`` on them: NRPM layers
put in place of ``qkv``/``proj`` would never run, and the converted model would silently be the
dense one. The classes here are the same modules (same parameters, buffers and configuration:
only ``forward`` differs) whose forward runs the same windowed attention but calls ``self.qkv(x)``
and ``self.proj(x)``. With plain or λ = 1 children the output is torchvision's, bit for bit
(tested on shifted, padded, V1 and V2 windows). ``convert`` switches an attention module to its
class here when it converts one of its children (:data:`robust_surgery.surgery.convert.WEIGHT_READING_PARENTS`);
``unconvert`` switches it back. This module imports torchvision, so it is imported only when a
model holds a Swin attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

__all__ = ["window_attention", "ModuleCallingShiftedWindowAttention", "ModuleCallingShiftedWindowAttentionV2"]


def _shift_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], like: torch.Tensor) -> torch.Tensor:
    """(windows, T, T) additive mask, T = window tokens: 0 between tokens of the same region of the
    cyclically shifted map, -100 across regions (what torchvision adds)."""
    region = like.new_zeros((pad_h, pad_w))
    rows = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    cols = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    label = 0
    for r in rows:
        for c in cols:
            region[r[0]:r[1], c[0]:c[1]] = label
            label += 1
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    mask = region.unsqueeze(1) - region.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def window_attention(x: torch.Tensor, qkv: nn.Module, proj: nn.Module, relative_position_bias: torch.Tensor,
                     window_size: list[int], num_heads: int, shift_size: list[int], attention_dropout: float = 0.0,
                     dropout: float = 0.0, logit_scale: torch.Tensor | None = None,
                     training: bool = True) -> torch.Tensor:
    """(Shifted) window self-attention of a (B, H, W, C) map -> (B, H, W, C), with the projections
    as modules: ``qkv`` maps (…, C) -> (…, 3C), ``proj`` (…, C) -> (…, C).

    The computation of torchvision's ``shifted_window_attention``: zero-pad H, W to multiples of
    the window, roll by ``-shift_size`` (no shift along a side the window covers), split into
    windows of T tokens, per-head attention (scaled dot product, or V2's cosine attention times
    ``exp(min(logit_scale, log 100))`` when ``logit_scale`` is given) plus
    ``relative_position_bias`` (heads, T, T) and the shifted-region mask, then ``proj``, roll back
    and crop. Padded tokens pass through ``qkv`` like every other token, as in torchvision. V2
    zeroes the key part of the qkv bias in its forward; here that part is subtracted from
    ``qkv``'s output (exactly the same when it is 0, as torchvision keeps it).
    """
    B, H, W, C = x.shape
    pad_w = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_h = (window_size[0] - H % window_size[0]) % window_size[0]
    t = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    _, pH, pW, _ = t.shape
    shift = [0 if window_size[0] >= pH else shift_size[0], 0 if window_size[1] >= pW else shift_size[1]]
    if sum(shift) > 0:
        t = torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = pH // window_size[0], pW // window_size[1]
    t = t.view(B, nh, window_size[0], nw, window_size[1], C).permute(0, 1, 3, 2, 4, 5)
    t = t.reshape(B * nh * nw, window_size[0] * window_size[1], C)  # (B·windows, T, C)
    n, T = t.shape[:2]

    out = qkv(t)
    bias = getattr(qkv, "bias", None)
    if logit_scale is not None and bias is not None:
        out = out - torch.cat([torch.zeros_like(bias[:C]), bias[C:2 * C], torch.zeros_like(bias[2 * C:])])
    q, k, v = out.reshape(n, T, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (C // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = _shift_mask(pH, pW, window_size, shift, t)
        attn = attn.view(n // (nh * nw), nh * nw, num_heads, T, T) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, T, T)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)

    t = attn.matmul(v).transpose(1, 2).reshape(n, T, C)
    t = F.dropout(proj(t), p=dropout, training=training)
    t = t.view(B, nh, nw, window_size[0], window_size[1], C).permute(0, 1, 3, 2, 4, 5).reshape(B, pH, pW, C)
    if sum(shift) > 0:
        t = torch.roll(t, shifts=(shift[0], shift[1]), dims=(1, 2))
    return t[:, :H, :W, :].contiguous()


class ModuleCallingShiftedWindowAttention(ShiftedWindowAttention):
    """``ShiftedWindowAttention`` whose forward calls ``self.qkv``/``self.proj``: (B, H, W, C) -> (B, H, W, C)."""

    calls_children_of = ShiftedWindowAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(x, self.qkv, self.proj, self.get_relative_position_bias(), self.window_size,
                                self.num_heads, self.shift_size, self.attention_dropout, self.dropout,
                                training=self.training)


class ModuleCallingShiftedWindowAttentionV2(ShiftedWindowAttentionV2):
    """``ShiftedWindowAttentionV2`` whose forward calls ``self.qkv``/``self.proj`` (its ``cpb_mlp`` is
    called as a module by torchvision already): (B, H, W, C) -> (B, H, W, C)."""

    calls_children_of = ShiftedWindowAttentionV2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(x, self.qkv, self.proj, self.get_relative_position_bias(), self.window_size,
                                self.num_heads, self.shift_size, self.attention_dropout, self.dropout,
                                logit_scale=self.logit_scale, training=self.training)
