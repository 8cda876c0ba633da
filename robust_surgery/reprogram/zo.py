"""Zeroth-order gradient estimation (BAR): random directions on the unit sphere."""
from __future__ import annotations

from typing import Callable

import torch

from robust_surgery.errors import InvalidInputError

__all__ = ["unit_sphere", "zo_gradient"]


def unit_sphere(q: int, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """``q`` directions uniform on the unit sphere of R^d (normalised Gaussians): ``(q, *shape)``."""
    u = torch.randn(q, *shape, generator=generator)
    return u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(q, *([1] * len(shape)))


def zo_gradient(f: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, q: int, beta: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ĝ = (1/q) Σ_j b · (f(w + βU_j) − f(w)) / β · U_j with b = d = ``w.numel()``; returns (ĝ, f(w)).

    ``f`` maps a stack of k parameter tensors ``(k, *w.shape)`` to their k losses ``(k,)``; it is
    called twice: once with w alone and once with the q perturbed copies (so a loss over a batch
    of B examples costs B·(q + 1) queries per estimate). ``beta``: the smoothing radius.
    """
    if q < 1 or not beta > 0:
        raise InvalidInputError(f"the zeroth-order estimator needs q >= 1 directions and β > 0 (got q={q}, β={beta})")
    w = w.detach()
    d = w.numel()
    u = unit_sphere(q, tuple(w.shape), generator).to(w)
    f0 = f(w[None])
    fs = f(w[None] + beta * u)
    if f0.shape != (1,) or fs.shape != (q,):
        raise InvalidInputError(f"f must return one loss per parameter copy, got shapes {tuple(f0.shape)} and {tuple(fs.shape)}")
    coef = (d / (q * beta)) * (fs - f0)
    g = (coef.view(q, *([1] * w.dim())) * u).sum(0)
    return g, f0[0]
