"""Per-unit purity scores of a layer in a feature basis (``docs/purification.md``), and the bases.

A unit with weight w (its fan-in, flattened) reads the features of a basis A (columns = atoms,
scaled for unit-variance sources) through its feature response r = Aᵀ w. Scores of r, n atoms:

- participation ratio PR = (Σ r²)² / Σ r⁴ (1 pure ... n flat; Gaussian r: about (n + 2) / 3);
- top-k energy: the k largest r² over Σ r²;
- Hoyer sparsity (√n − ‖r‖₁/‖r‖₂) / (√n − 1) (1 one-hot, 0 flat);
- Gini index of |r| (Hurley & Rickard 2009): 1 − 1/n one-hot, 0 flat;
- entropy count exp(−Σ p log p), p = r² / ‖r‖² (1 pure ... n flat).

Bases: a given matrix (the true dictionary of synthetic data, or a file), FastICA on whitened
input patches, sparse dictionary learning with OMP coding, and a random orthonormal control.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from robust_surgery.errors import InvalidInputError, MissingFileError

__all__ = [
    "BASES",
    "Basis",
    "PurityScores",
    "dictionary_basis",
    "entropy_count",
    "gini",
    "hoyer",
    "ica_basis",
    "layer_units",
    "load_basis_file",
    "participation_ratio",
    "purity_scores",
    "random_orthonormal_basis",
    "top_k_energy",
]

BASES = ("ica", "dict", "random", "true")
_TINY = 1e-30


def _check_r(r: torch.Tensor) -> torch.Tensor:
    if r.dim() not in (1, 2) or r.shape[-1] < 1:
        raise InvalidInputError(f"feature responses must be a vector (n,) or a matrix (units, n), got shape {tuple(r.shape)}")
    return r.double()


def participation_ratio(r: torch.Tensor) -> torch.Tensor:
    """PR = (Σ r²)² / Σ r⁴ over the last axis of r ((n,) or (units, n)): 1 one-hot ... n flat."""
    e = _check_r(r) ** 2
    return e.sum(-1) ** 2 / (e ** 2).sum(-1).clamp_min(_TINY)


def top_k_energy(r: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Fraction of Σ r² in the ``k`` largest r² (last axis of r): 1 pure ... k/n flat."""
    e = _check_r(r) ** 2
    if not 1 <= k <= e.shape[-1]:
        raise InvalidInputError(f"k must be between 1 and the number of atoms {e.shape[-1]}, got {k}")
    return e.topk(k, dim=-1).values.sum(-1) / e.sum(-1).clamp_min(_TINY)


def hoyer(r: torch.Tensor) -> torch.Tensor:
    """Hoyer sparsity (√n − ‖r‖₁/‖r‖₂) / (√n − 1) (last axis): 1 one-hot, 0 flat."""
    r = _check_r(r)
    n = r.shape[-1]
    if n < 2:
        raise InvalidInputError("Hoyer sparsity needs at least 2 atoms")
    ratio = r.abs().sum(-1) / r.norm(dim=-1).clamp_min(_TINY)
    return (math.sqrt(n) - ratio) / (math.sqrt(n) - 1)


def gini(r: torch.Tensor) -> torch.Tensor:
    """Gini index of |r| (Hurley & Rickard 2009), last axis: 0 flat, 1 − 1/n one-hot."""
    a = _check_r(r).abs().sort(-1).values  # ascending
    n = a.shape[-1]
    k = torch.arange(1, n + 1, dtype=a.dtype)
    total = a.sum(-1, keepdim=True).clamp_min(_TINY)
    return 1 - 2 * ((a / total) * ((n - k + 0.5) / n)).sum(-1)


def entropy_count(r: torch.Tensor) -> torch.Tensor:
    """exp(−Σ p log p), p = r² / ‖r‖² (last axis): the effective number of atoms, 1 ... n."""
    e = _check_r(r) ** 2
    p = e / e.sum(-1, keepdim=True).clamp_min(_TINY)
    return torch.exp(-(p * torch.log(p.clamp_min(_TINY))).sum(-1))


@dataclass
class PurityScores:
    """Per-unit scores of one layer in one basis (tensors of shape (units,)) and their summary.

    ``weights``: optional per-unit weights for the weighted mean (the next layer's weight norms).
    """

    basis: str
    pr: torch.Tensor
    top1: torch.Tensor
    top3: torch.Tensor
    hoyer: torch.Tensor
    gini: torch.Tensor
    entropy: torch.Tensor
    n_atoms: int
    weights: torch.Tensor | None = field(default=None, repr=False)

    SCORES = ("pr", "top1", "top3", "hoyer", "gini", "entropy")

    def summary(self) -> dict:
        """Per score: mean, median and (with ``weights``) the weighted mean, as floats."""
        out: dict = {"basis": self.basis, "n_atoms": self.n_atoms, "units": int(self.pr.numel()),
                     "pr_gaussian": (self.n_atoms + 2) / 3}
        for name in self.SCORES:
            v = getattr(self, name).double()
            row = {"mean": float(v.mean()), "median": float(v.median()), "std": float(v.std()) if v.numel() > 1 else 0.0}
            if self.weights is not None:
                w = self.weights.double()
                row["weighted_mean"] = float((w * v).sum() / w.sum().clamp_min(_TINY))
            out[name] = row
        return out

    def per_unit(self) -> dict:
        """Every score per unit, as lists of floats (JSON-able)."""
        return {name: [round(float(v), 6) for v in getattr(self, name)] for name in self.SCORES}


def purity_scores(units: torch.Tensor, basis: torch.Tensor, *, name: str = "basis",
                  unit_weights: torch.Tensor | None = None) -> PurityScores:
    """Scores of every unit of a layer in a basis.

    units: (U, D) weight rows (one per unit, fan-in flattened); basis: (D, n) atoms as columns;
    unit_weights: optional (U,) weights for the weighted mean. The response is r = Aᵀ w, (U, n).
    """
    if units.dim() != 2 or basis.dim() != 2:
        raise InvalidInputError(f"units must be (U, D) and basis (D, n); got {tuple(units.shape)} and {tuple(basis.shape)}")
    if units.shape[1] != basis.shape[0]:
        raise InvalidInputError(f"the basis has atoms of dimension {basis.shape[0]} but the layer's units read "
                         f"{units.shape[1]} inputs; learn or load a basis for this layer's fan-in")
    if unit_weights is not None and unit_weights.shape != (units.shape[0],):
        raise InvalidInputError(f"unit_weights must have shape ({units.shape[0]},), got {tuple(unit_weights.shape)}")
    r = units.detach().double() @ basis.detach().double()
    n = r.shape[1]
    return PurityScores(basis=name, pr=participation_ratio(r), top1=top_k_energy(r, 1), top3=top_k_energy(r, min(3, n)),
                        hoyer=hoyer(r) if n > 1 else torch.ones(len(r)), gini=gini(r), entropy=entropy_count(r),
                        n_atoms=n, weights=unit_weights)


# --------------------------------------------------------------------------------------------
# Units of a layer
# --------------------------------------------------------------------------------------------
def layer_units(layer: nn.Module) -> torch.Tensor:
    """The weight rows of a Linear or Conv layer, (units, fan-in): conv kernels flattened in
    (in-channel, kh, kw) order, the order of ``F.unfold`` patches. Grouped convs are refused."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float()
    if isinstance(layer, nn.modules.conv._ConvNd):
        if layer.groups != 1:
            raise InvalidInputError("purity of grouped/depthwise convolutions is not supported: their units read "
                             "different input channels; pick a layer with groups = 1")
        return layer.weight.detach().flatten(1).float()
    raise InvalidInputError(f"purity needs a Linear or Conv layer, got {type(layer).__name__}")


# --------------------------------------------------------------------------------------------
# Bases (all (D, n): atoms as columns)
# --------------------------------------------------------------------------------------------
@dataclass
class Basis:
    """A feature basis: ``atoms`` (D, n) as columns, its ``name`` and how it was made."""

    name: str
    atoms: torch.Tensor
    info: dict = field(default_factory=dict)


def random_orthonormal_basis(dim: int, seed: int = 0) -> Basis:
    """A Haar-random orthonormal basis of R^dim (the control), (dim, dim)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return Basis("random", (q * torch.sign(torch.diagonal(r))).float(), {"seed": seed})


def _check_patches(patches: torch.Tensor, n_atoms: int | None) -> tuple[np.ndarray, int]:
    if patches.dim() != 2:
        raise InvalidInputError(f"patches must be (N, D), got shape {tuple(patches.shape)}")
    n, dim = patches.shape
    k = dim if n_atoms is None else int(n_atoms)
    if not 1 <= k <= dim:
        raise InvalidInputError(f"n_atoms must be between 1 and the patch dimension {dim}, got {k}")
    if n < 2 * k:
        raise InvalidInputError(f"{n} patches are too few to learn {k} atoms; give at least {2 * k} (more data or --n)")
    return patches.detach().double().cpu().numpy(), k


def ica_basis(patches: torch.Tensor, n_atoms: int | None = None, seed: int = 0, max_iter: int = 400) -> Basis:
    """FastICA on whitened patches (N, D): the mixing matrix (D, n_atoms), columns = atoms scaled
    for unit-variance sources, so that x − mean ≈ A s with s white."""
    from sklearn.decomposition import FastICA

    x, k = _check_patches(patches, n_atoms)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ica = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=max_iter, tol=1e-4)
        ica.fit(x)
    converged = not any("did not converge" in str(w.message) for w in caught)
    return Basis("ica", torch.from_numpy(ica.mixing_).float(),
                 {"seed": seed, "n_patches": len(x), "n_iter": int(ica.n_iter_), "converged": converged})


def dictionary_basis(patches: torch.Tensor, n_atoms: int | None = None, seed: int = 0, alpha: float = 1.0,
                     n_nonzero: int | None = None, batch_size: int = 256, max_iter: int = 20) -> Basis:
    """Sparse dictionary learning (mini-batch, OMP coding) on centred patches (N, D): (D, n_atoms),
    unit-norm atoms each scaled by the std of its OMP code (unit-variance sources, as for ICA)."""
    from sklearn.decomposition import MiniBatchDictionaryLearning

    x, k = _check_patches(patches, n_atoms)
    x = x - x.mean(0, keepdims=True)
    n_nonzero = n_nonzero or max(1, k // 8)
    dl = MiniBatchDictionaryLearning(n_components=k, alpha=alpha, batch_size=batch_size, max_iter=max_iter,
                                     random_state=seed, transform_algorithm="omp",
                                     transform_n_nonzero_coefs=n_nonzero)
    codes = dl.fit(x).transform(x)
    scale = codes.std(0)
    scale[scale == 0] = 1.0
    atoms = dl.components_.T * scale[None, :]
    return Basis("dict", torch.from_numpy(atoms).float(),
                 {"seed": seed, "n_patches": len(x), "alpha": alpha, "omp_nonzero": n_nonzero})


def load_basis_file(path) -> Basis:
    """A basis from a file: ``.pt`` (a tensor, or a dict with ``atoms``), ``.npy`` or ``.txt``/``.csv``;
    a (D, n) matrix with atoms as columns."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"basis file {path} not found; --basis takes ica, dict, random, true or a file "
                                "(.pt, .npy, .txt) holding a D x n matrix of atoms as columns")
    if path.is_dir():
        raise InvalidInputError(f"basis file {path} is a folder; give a .pt, .npy or .txt file")
    if path.stat().st_size == 0:
        raise InvalidInputError(f"basis file {path} is empty (0 bytes); it must hold a D x n matrix of atoms as columns")
    try:
        if path.suffix == ".npy":
            atoms = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix in (".txt", ".csv"):
            atoms = torch.from_numpy(np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2))
        else:
            obj = torch.load(path, weights_only=True, map_location="cpu")
            atoms = obj.get("atoms") if isinstance(obj, dict) else obj
    except Exception as e:  # numpy and torch raise many types for a damaged file
        raise InvalidInputError(f"basis file {path} could not be read ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]}); it must hold a D x n matrix of atoms "
                         "(.pt tensor or dict with 'atoms', .npy, .txt/.csv)") from None
    if not torch.is_tensor(atoms) or atoms.dim() != 2 or atoms.numel() == 0:
        raise InvalidInputError(f"{path} must hold a 2-D matrix (D, n) of atoms as columns")
    if not torch.isfinite(atoms).all():
        raise InvalidInputError(f"{path}: the basis holds NaN or infinite values")
    return Basis(f"file:{path.name}", atoms.float(), {"path": str(path)})
