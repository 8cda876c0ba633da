"""The input program of AR and BAR: centre embedding, mask and P = tanh(W ⊙ M).

A target input (e.g. a 1 × 28 × 28 digit in [0, 1]) is optionally resized, its channels copied
to the source's (grey → RGB), and placed in the centre of a source-sized canvas. The mask M is
0 where the data sits and 1 elsewhere. Elsayed et al. work in [-1, 1]: X̃ = X + tanh(W ⊙ M) with
X zero outside the data. We do the same and map it to the source's input range [lo, hi]:

    X̃ = (1 − M) ⊙ embed(x) + M ⊙ (lo + (hi − lo) · (tanh(W) + 1) / 2)

so the data region is the target input itself, untouched, and the program covers the whole
input range elsewhere (W = 0 is mid-grey). With ``cover_data`` the program also acts on the data
region, additively, as visual prompting's full-image prompt does (its entries of W, unused
otherwise, are the additive part; W = 0 leaves the data as it is):

    X̃ = (1 − M) ⊙ clamp(embed(x) + (hi − lo) · tanh(W) / 2, lo, hi) + M ⊙ (the frame above)

The source model's own normalisation (a module inside every zoo model) follows. A
low-dimensional program keeps W coarse, ``(C, r, r)``, and upsamples it to the canvas (nearest),
which cuts d, the number of trained entries (BAR's variance).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.errors import InvalidInputError

__all__ = ["CanvasSpec", "Program", "centre_embed", "data_mask"]


class CanvasSpec:
    """Geometry of the program: canvas ``(C, H, W)``, the data's side after resizing, its channels.

    ``data_size``: the side of the (square) data region in canvas pixels; the target input is
    resized to it (bilinear, antialiased) when its own size differs. ``data_channels``: channels of
    the target input (1 for MNIST); 1 is copied to every canvas channel. ``input_range``: the
    source's input range ``(lo, hi)`` (zoo models: (0, 1)).
    """

    def __init__(self, canvas: Sequence[int] = (3, 32, 32), data_size: int = 28, data_channels: int = 1,
                 input_range: Sequence[float] = (0.0, 1.0)):
        canvas = tuple(int(v) for v in canvas)
        if len(canvas) != 3 or min(canvas) < 1:
            raise InvalidInputError(f"canvas must be (channels, height, width) of the source's input, got {canvas}")
        if not 1 <= int(data_size) <= min(canvas[1:]):
            raise InvalidInputError(f"data_size {data_size} must be between 1 and the canvas side {min(canvas[1:])} "
                             "(lower --data-size, or use a larger canvas)")
        if data_channels not in (1, canvas[0]):
            raise InvalidInputError(f"target inputs with {data_channels} channels cannot fill a {canvas[0]}-channel canvas "
                             "(give 1-channel inputs, copied to every channel, or as many channels as the source)")
        lo, hi = (float(v) for v in input_range)
        if not hi > lo:
            raise InvalidInputError(f"input_range must be (lo, hi) with hi > lo, got {tuple(input_range)}")
        self.canvas, self.data_size, self.data_channels, self.input_range = canvas, int(data_size), int(data_channels), (lo, hi)

    @property
    def offset(self) -> tuple[int, int]:
        """(top, left) corner of the data region in the canvas (centred; extra pixel right/below)."""
        return (self.canvas[1] - self.data_size) // 2, (self.canvas[2] - self.data_size) // 2

    def to_dict(self) -> dict:
        """JSON-able description (manifest ``arch_kwargs``)."""
        return {"canvas": list(self.canvas), "data_size": self.data_size, "data_channels": self.data_channels,
                "input_range": list(self.input_range)}


def data_mask(spec: CanvasSpec) -> torch.Tensor:
    """Mask M ``(1, H, W)``: 0.0 on the data region, 1.0 where the program acts."""
    _, H, W = spec.canvas
    top, left = spec.offset
    m = torch.ones(1, H, W)
    m[:, top:top + spec.data_size, left:left + spec.data_size] = 0.0
    return m


def centre_embed(x: torch.Tensor, spec: CanvasSpec) -> torch.Tensor:
    """Target inputs ``(B, c, h, w)`` in [0, 1] -> canvases ``(B, C, H, W)`` in the source's range.

    Resized to ``data_size`` when needed, grey copied to every channel, placed in the centre;
    zeros elsewhere (the program fills that part).
    """
    if x.dim() != 4 or x.shape[1] != spec.data_channels:
        raise InvalidInputError(f"target inputs must be (batch, {spec.data_channels}, h, w), got {tuple(x.shape)}")
    s = spec.data_size
    if x.shape[-2:] != (s, s):
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)
    lo, hi = spec.input_range
    if (lo, hi) != (0.0, 1.0):
        x = lo + (hi - lo) * x
    C, H, W = spec.canvas
    if x.shape[1] != C:
        x = x.expand(-1, C, -1, -1)
    top, left = spec.offset
    return F.pad(x, (left, W - s - left, top, H - s - top))


class Program(nn.Module):
    """The trainable input program: ``forward(x)`` = X̃, the source input for target inputs x.

    ``low_dim``: None (W has the canvas's size) or r (W is ``(C, r, r)``, upsampled to the
    canvas). ``weight`` (W) is the only parameter; ``d`` its number of entries. ``cover_data``:
    the program also adds a bounded pattern to the data region (see the module docstring).
    Input ``(B, data_channels, h, w)`` in [0, 1]; output ``(B, C, H, W)`` in ``input_range``.
    """

    def __init__(self, spec: CanvasSpec, low_dim: int | None = None, cover_data: bool = False):
        super().__init__()
        C, H, W = spec.canvas
        if low_dim is not None and not 1 <= int(low_dim) <= min(H, W):
            raise InvalidInputError(f"low_dim must be between 1 and the canvas side {min(H, W)}, got {low_dim}")
        self.spec = spec
        self.low_dim = None if low_dim is None else int(low_dim)
        self.cover_data = bool(cover_data)
        shape = (C, H, W) if low_dim is None else (C, self.low_dim, self.low_dim)
        self.weight = nn.Parameter(torch.zeros(shape))
        self.register_buffer("mask", data_mask(spec), persistent=False)

    @property
    def d(self) -> int:
        """Number of entries of W (the dimension of BAR's gradient estimate)."""
        return self.weight.numel()

    def full_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """W at canvas size ``(..., C, H, W)``; ``weight`` (default: the parameter) may carry batch dims."""
        w = self.weight if weight is None else weight
        if self.low_dim is None:
            return w
        lead = w.shape[:-3]
        up = F.interpolate(w.reshape(-1, *w.shape[-3:]), size=self.spec.canvas[1:], mode="nearest")
        return up.reshape(*lead, *up.shape[1:])

    def perturbation(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The program's pixels outside the data, in the input range: ``(..., C, H, W)``."""
        lo, hi = self.spec.input_range
        p = torch.tanh(self.full_weight(weight) * self.mask)  # P = tanh(W ⊙ M)
        return lo + (hi - lo) * (p + 1.0) / 2.0

    def data_part(self, data: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The data region of X̃ from embedded inputs ``data`` ``(..., B, C, H, W)``: the inputs
        themselves, or with ``cover_data`` the inputs plus (hi − lo)·tanh(W)/2, clamped to the
        input range; ``weight`` ``(..., *W.shape)`` broadcasts over the batch dimension."""
        if not self.cover_data:
            return (1.0 - self.mask) * data
        lo, hi = self.spec.input_range
        add = (hi - lo) * torch.tanh(self.full_weight(weight)) / 2.0
        if add.dim() == 4:  # (k, C, H, W) programs against (k, B, C, H, W) inputs
            add = add[:, None]
        return (1.0 - self.mask) * (data + add).clamp(lo, hi)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, c, h, w)`` target inputs -> ``(B, C, H, W)`` programmed source inputs.

        ``weight``: use this W (same shape as the parameter) instead of the parameter (BAR's
        perturbed programs).
        """
        return self.data_part(centre_embed(x, self.spec), weight) + self.mask * self.perturbation(weight)

    def batched(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Programmed inputs for k programs at once: ``weights`` ``(k, *W.shape)`` → ``(k, B, C, H, W)``."""
        if weights.shape[1:] != self.weight.shape:
            raise InvalidInputError(f"program weights must be (k, {', '.join(map(str, self.weight.shape))}), got {tuple(weights.shape)}")
        return self.data_part(centre_embed(x, self.spec)[None], weights) + self.mask * self.perturbation(weights)[:, None]

    def extra_repr(self) -> str:
        return (f"canvas={self.spec.canvas}, data_size={self.spec.data_size}, low_dim={self.low_dim}, d={self.d}"
                + (", cover_data=True" if self.cover_data else ""))
