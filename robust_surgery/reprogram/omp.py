"""Orthogonal matching pursuit (OMP), batched over signals, for R2DL's k-sparse projection.

R2DL keeps each row of Θ k-sparse: the row's dense embedding θ_t·V_S is re-coded as a
combination of exactly k rows of the fixed source embedding matrix V_S. With |V_S| = 30522 and
embedding size 384 the work per OMP iteration is one ``(T, H) @ (H, V)`` correlation product for
all T target tokens at once, plus T small least-squares solves.
"""
from __future__ import annotations

import torch

from robust_surgery.errors import InvalidInputError

__all__ = ["omp", "sparse_to_dense"]


def omp(signals: torch.Tensor, dictionary: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-sparse codes of ``signals`` (T, H) over the atoms (rows) of ``dictionary`` (V, H).

    Returns ``(indices (T, k) int64, values (T, k))`` with ``signals[t] ≈ values[t] @
    dictionary[indices[t]]``. Each of the k iterations picks, per signal, the not yet chosen atom
    whose *normalised* direction correlates most with the residual (atoms need not have unit
    norm: this equals scikit-learn's ``orthogonal_mp`` on the column-normalised dictionary, with
    the coefficients rescaled), then refits all chosen coefficients by least squares (float64)
    and updates the residual. The support always has exactly k distinct atoms; all-zero atoms
    (such as a padding token's row) are never chosen.
    """
    if signals.dim() != 2 or dictionary.dim() != 2 or signals.shape[1] != dictionary.shape[1]:
        raise InvalidInputError(f"omp needs signals (T, H) and a dictionary (V, H) of the same H, got "
                         f"{tuple(signals.shape)} and {tuple(dictionary.shape)}")
    n_atoms = dictionary.shape[0]
    if not 1 <= k <= min(n_atoms, dictionary.shape[1]):
        raise InvalidInputError(f"k must be between 1 and min(number of atoms, dimension) = "
                         f"{min(n_atoms, dictionary.shape[1])}, got {k}")
    with torch.no_grad():
        d = dictionary.detach().to(torch.float32)
        norms = d.norm(dim=1)
        zero = norms == 0  # e.g. a [PAD] row: never selectable
        if int((~zero).sum()) < k:
            raise InvalidInputError(f"the dictionary has only {int((~zero).sum())} non-zero atoms, fewer than k = {k}")
        d_unit = d / norms.clamp_min(torch.finfo(d.dtype).tiny)[:, None]
        y = signals.detach().to(torch.float64)
        n = y.shape[0]
        rows = torch.arange(n, device=y.device)
        chosen = torch.empty((n, 0), dtype=torch.long, device=y.device)
        residual = y
        coef = torch.empty((n, 0), dtype=torch.float64, device=y.device)
        for _ in range(k):
            corr = (residual.to(torch.float32) @ d_unit.T).abs()
            corr[:, zero] = -1.0
            corr[rows[:, None].expand_as(chosen), chosen] = -1.0  # never pick an atom twice
            chosen = torch.cat([chosen, corr.argmax(dim=1, keepdim=True)], dim=1)
            atoms = d[chosen].to(torch.float64)  # (T, i, H)
            coef = torch.linalg.lstsq(atoms.transpose(1, 2), y[:, :, None]).solution[:, :, 0]  # (T, i)
            residual = y - torch.einsum("ti,tih->th", coef, atoms)
    return chosen, coef.to(signals.dtype)


def sparse_to_dense(indices: torch.Tensor, values: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """The dense ``(T, n_atoms)`` matrix with ``values`` (T, k) at columns ``indices`` (T, k)."""
    out = torch.zeros((indices.shape[0], n_atoms), dtype=values.dtype, device=values.device)
    return out.scatter_(1, indices, values)
