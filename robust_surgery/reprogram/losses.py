"""Losses on mapped probabilities h (values in [0, 1], one row per example): AR's and BAR's."""
from __future__ import annotations

import torch

from robust_surgery.errors import InvalidInputError

__all__ = ["mapped_nll", "focal_loss", "class_balance_weights"]

_FLOOR = 1e-12


def mapped_nll(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AR's cross-entropy −log h_y, averaged: ``h`` ``(B, n_target)`` mapped probabilities, ``y`` ``(B,)``."""
    return -h.gather(-1, y[:, None]).clamp_min(_FLOOR).log().mean()


def class_balance_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """ω_j ∝ 1/n_j, scaled so the mean weight per training example is 1: ``(n_classes,)``.

    ``labels`` ``(N,)``; a class without examples gets weight 0. Balanced data gives all ones,
    so focal loss with γ = 0 is then exactly :func:`mapped_nll`.
    """
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=n_classes).to(torch.float64)
    present = int((counts > 0).sum())
    if present == 0:
        raise InvalidInputError("no labels given: class-balance weights need the target training labels")
    w = torch.where(counts > 0, len(labels) / (present * counts.clamp_min(1)), torch.zeros_like(counts))
    return w.to(torch.float32)


def focal_loss(h: torch.Tensor, y: torch.Tensor, gamma: float = 2.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """BAR's focal loss −ω_y (1 − h_y)^γ log h_y, averaged over the batch.

    ``h``: ``(..., B, n_target)`` mapped probabilities (leading dims, e.g. one per perturbed
    program, are kept: the result is ``(...)``); ``y``: ``(B,)``; ``weights``: ``(n_target,)``
    class weights ω (None: all 1). γ = 0 and ω = 1 is the cross-entropy :func:`mapped_nll`.
    """
    if gamma < 0:
        raise InvalidInputError(f"focal loss needs γ >= 0, got {gamma}")
    idx = y.expand(*h.shape[:-1])[..., None]
    hy = h.gather(-1, idx).squeeze(-1).clamp(_FLOOR, 1.0)
    loss = -(1.0 - hy).pow(gamma) * hy.log()
    if weights is not None:
        loss = loss * weights.to(h.device)[y]
    return loss.mean(dim=-1)
