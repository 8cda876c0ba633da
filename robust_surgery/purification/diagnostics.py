"""Purification diagnostics of a trained model (``docs/purification.md``): is a layer made of pure units?

- :func:`purification_report`: per-unit purity of one layer in a feature basis (true, ICA,
  dictionary or a file) beside the random orthonormal control, plus the basis-free diagnostics,
  and optionally the clean-vs-adversarial checkpoint-pair decomposition against a second model.
- :func:`layer_input_patches`: the layer's inputs cut into patches of its receptive field (via a
  forward hook, so a model's own normalisation is included), to learn a basis from.
- :func:`hook_diagnostics`: per-unit pre-activation kurtosis and activation rate at any depth.
- :func:`checkpoint_pair`: β, v, the fraction of units with ‖β w′‖ > ‖v‖, the stable rank of ΔW.

- plots: :func:`plot_purity_histograms` (model vs control), :func:`plot_filters` (a layer's
  kernels as an image grid), :func:`plot_purity_vs_eps`.

Scores and bases are in :mod:`robust_surgery.purification.scores`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.purification.scores import (BASES, Basis, PurityScores, dictionary_basis, ica_basis, layer_units, load_basis_file,
                     purity_scores, random_orthonormal_basis)
from robust_surgery.purification.synthetic import SparseCodingTask
from robust_surgery.errors import InvalidInputError
from robust_surgery.evaluation.plot import figure, save_figure

__all__ = [
    "PurificationReport",
    "checkpoint_pair",
    "get_layer",
    "hook_diagnostics",
    "layer_input_patches",
    "learn_basis",
    "load_images",
    "next_layer_weights",
    "plot_filters",
    "plot_purity_histograms",
    "plot_purity_vs_eps",
    "purification_report",
    "whitened_random_basis",
]

_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The Linear/Conv submodule ``name`` of ``model``, or a clear error listing the valid names."""
    layers = [n for n, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or not isinstance(module, _LAYER_TYPES):
        shown = ", ".join(layers[:12]) + (" ..." if len(layers) > 12 else "")
        raise InvalidInputError(f"no Linear/Conv layer named {name!r} in the model; layers: {shown}")
    return module


def load_images(data, n: int | None = 2000, split: str = "test", data_root=None):
    """(images (N, ...) in [0, 1], labels (N,), synthetic task or None): :func:`robust_surgery.data.resolve.resolve_data`
    of ``data`` (at most ``n`` points of ``split``; all of them for None)."""
    from robust_surgery.data.resolve import resolve_data

    if n is not None and n < 1:
        raise InvalidInputError(f"n must be a positive number of inputs, got {n}")
    r = resolve_data(data, split, data_root=data_root)
    x, y = r.tensors
    return (x, y, r.task) if n is None else (x[:n], y[:n], r.task)


@torch.no_grad()
def _run_hooked(model: nn.Module, images: torch.Tensor, hooks: dict[str, nn.Module], fn, batch_size: int = 256):
    """Run ``model`` over ``images`` in batches; ``fn(name, module, input, output)`` sees every hooked call."""
    handles = [m.register_forward_hook(lambda mod, inp, out, _n=n: fn(_n, mod, inp[0], out)) for n, m in hooks.items()]
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was)


def layer_input_patches(model: nn.Module, layer: str, images: torch.Tensor, n_patches: int = 20000,
                        seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Inputs of ``layer`` as the layer reads them, (n_patches, fan-in).

    Linear: the flattened input vectors. Conv2d: patches of the kernel's size (valid positions
    only, the layer's stride and dilation; padding is left out), flattened in (channel, kh, kw)
    order like the layer's weight rows. Up to ``n_patches`` patches drawn at random (seeded).
    """
    module = get_layer(model, layer)
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv2d):
        raise InvalidInputError("patches are implemented for Linear and Conv2d layers")
    chunks: list[torch.Tensor] = []

    def grab(_name, mod, inp, _out):
        if isinstance(mod, nn.Linear):
            chunks.append(inp.detach().reshape(-1, mod.in_features).cpu())
        else:
            cols = F.unfold(inp.detach(), mod.kernel_size, dilation=mod.dilation, stride=mod.stride)
            chunks.append(cols.transpose(1, 2).reshape(-1, cols.shape[1]).cpu())

    _run_hooked(model, images, {layer: module}, grab, batch_size)
    patches = torch.cat(chunks)
    if len(patches) > n_patches:
        g = torch.Generator().manual_seed(seed)
        patches = patches[torch.randperm(len(patches), generator=g)[:n_patches]]
    return patches


def whitened_random_basis(patches: torch.Tensor, seed: int = 0) -> Basis:
    """The control matched to ICA/dictionary bases: C^{1/2} Q with C the patch covariance and Q a
    random rotation, (D, D): atoms scaled for unit-variance sources like ICA's, but in random
    directions of the whitened space. Differences from it are about the atoms' directions."""
    x = patches.double() - patches.double().mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / max(len(x) - 1, 1))
    sqrt_c = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    q = random_orthonormal_basis(x.shape[1], seed).atoms.double()
    return Basis("random-white", (sqrt_c @ q).float(), {"seed": seed})


def learn_basis(kind: str, patches: torch.Tensor, *, n_atoms: int | None = None, seed: int = 0) -> Basis:
    """A basis of kind ``ica``, ``dict`` or ``random`` for patches (N, D); (D, n) atoms as columns."""
    if kind == "ica":
        return ica_basis(patches, n_atoms, seed=seed)
    if kind == "dict":
        return dictionary_basis(patches, n_atoms, seed=seed)
    if kind == "random":
        return random_orthonormal_basis(patches.shape[1], seed)
    raise InvalidInputError(f"unknown basis {kind!r}: use one of {', '.join(BASES)} or a file")


def next_layer_weights(model: nn.Module, layer: str) -> torch.Tensor | None:
    """Per-unit weights for the weighted mean: the norm of each unit's outgoing weights in the next
    Linear/Conv layer (module order) that reads this layer's units, (units,); None if there is none."""
    units = layer_units(get_layer(model, layer)).shape[0]
    names = [n for n, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]
    for name in names[names.index(layer) + 1:]:
        w = model.get_submodule(name).weight.detach().float()
        if isinstance(model.get_submodule(name), nn.Linear) and w.shape[1] % units == 0:
            return w.view(w.shape[0], units, -1).pow(2).sum((0, 2)).sqrt()  # channel-major flatten
        if w.dim() > 2 and w.shape[1] == units:
            return w.transpose(0, 1).flatten(1).norm(dim=1)
        return None
    return None


@torch.no_grad()
def hook_diagnostics(model: nn.Module, images: torch.Tensor, layers: list[str] | None = None,
                     batch_size: int = 256) -> dict[str, dict]:
    """Per-unit statistics of the pre-activations (the layer outputs) over ``images``.

    For every Linear/Conv layer (or the ``layers`` named): ``kurtosis`` (E(a−μ)⁴ / σ⁴; Gaussian 3,
    heavy tails from a sparse feature above 3) and ``active`` (fraction of inputs, and positions
    of a conv, with a > 0), as (units,) tensors, over all of them for conv feature maps.
    """
    names = layers or [n for n, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]
    hooks = {n: get_layer(model, n) for n in names}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def stats(name, _mod, _inp, out):
        a = out.detach().double()
        a = a.transpose(0, 1).reshape(a.shape[1], -1) if a.dim() > 2 else a.T  # units x samples
        s = torch.stack([a.sum(1), (a ** 2).sum(1), (a ** 3).sum(1), (a ** 4).sum(1), (a > 0).double().sum(1)])
        sums[name] = sums[name] + s if name in sums else s
        counts[name] = counts.get(name, 0) + a.shape[1]

    _run_hooked(model, images, hooks, stats, batch_size)
    out = {}
    for name in names:
        s1, s2, s3, s4, pos = sums[name] / counts[name]
        var = s2 - s1 ** 2
        m4 = s4 - 4 * s1 * s3 + 6 * s1 ** 2 * s2 - 3 * s1 ** 4
        kurt = torch.where(var > 1e-20, m4 / var.clamp_min(1e-20) ** 2, torch.full_like(var, float("nan")))
        out[name] = {"kurtosis": kurt.float(), "active": pos.float(), "samples": counts[name]}
    return out


def _summary(v: torch.Tensor) -> dict:
    v = v[~torch.isnan(v)].double()
    if not len(v):
        return {"mean": None, "median": None}
    return {"mean": float(v.mean()), "median": float(v.median())}


def checkpoint_pair(before: torch.Tensor | nn.Module, after: torch.Tensor | nn.Module) -> dict:
    """Clean (w) vs adversarial (w′) weights of the same layer, unit by unit (Allen-Zhu & Li).

    before/after: (U, D) weight rows or the two layers. Per unit β = ⟨w, w′⟩ / ‖w′‖² and
    v = w − β w′ (what clean training has that adversarial training removed). Returns the
    fraction of units with ‖β w′‖ > ‖v‖, mean/median β and cosine, the relative size of the change
    ‖ΔW‖_F / ‖W‖_F and the stable rank ‖ΔW‖_F² / ‖ΔW‖₂² of ΔW = W′ − W (1: one direction, up to min(U, D)).
    """
    w = layer_units(before) if isinstance(before, nn.Module) else before.detach().float()
    w2 = layer_units(after) if isinstance(after, nn.Module) else after.detach().float()
    if w.shape != w2.shape:
        raise InvalidInputError(f"the two checkpoints' layers differ in shape: {tuple(w.shape)} vs {tuple(w2.shape)}; "
                         "compare the same layer of the same architecture")
    w, w2 = w.double(), w2.double()
    beta = (w * w2).sum(1) / (w2 * w2).sum(1).clamp_min(1e-30)
    v = w - beta[:, None] * w2
    kept = beta.abs() * w2.norm(dim=1)
    cos = (w * w2).sum(1) / (w.norm(dim=1) * w2.norm(dim=1)).clamp_min(1e-30)
    delta = w2 - w
    fro2 = float((delta ** 2).sum())
    spec = float(torch.linalg.matrix_norm(delta, ord=2)) if fro2 > 0 else 0.0
    return {
        "units": int(w.shape[0]),
        "fraction_beta_dominant": float((kept > v.norm(dim=1)).double().mean()),
        "beta": _summary(beta), "cosine": _summary(cos),
        "v_over_w": _summary(v.norm(dim=1) / w.norm(dim=1).clamp_min(1e-30)),
        "relative_change": (fro2 ** 0.5) / max(float(w.norm()), 1e-30),
        "stable_rank_change": fro2 / spec ** 2 if spec > 0 else 0.0,
    }


@dataclass
class PurificationReport:
    """Purity of one layer in several bases, its diagnostics and (optionally) a checkpoint pair."""

    model: str
    layer: str
    dataset: str
    n: int
    units: int
    fan_in: int
    scores: list[PurityScores]
    bases: list[Basis]
    diagnostics: dict
    pair: dict | None = None
    compare: str | None = None
    filters: torch.Tensor | None = field(default=None, repr=False)

    def score(self, basis: str) -> PurityScores:
        """The scores in the basis named ``basis``."""
        for s in self.scores:
            if s.basis == basis:
                return s
        raise KeyError(f"no scores in basis {basis!r}; have {[s.basis for s in self.scores]}")

    def to_dict(self, per_unit: bool = False) -> dict:
        """JSON-able summary (``per_unit`` adds every unit's scores)."""
        d = self.diagnostics
        out = {
            "model": self.model, "layer": self.layer, "dataset": self.dataset, "n_examples": self.n,
            "units": self.units, "fan_in": self.fan_in,
            "purity": {s.basis: s.summary() for s in self.scores},
            "bases": {b.name: b.info for b in self.bases},
            "diagnostics": {"kurtosis": _summary(d["kurtosis"]), "active": _summary(d["active"]),
                            "samples": d["samples"]},
        }
        if per_unit:
            out["per_unit"] = {s.basis: s.per_unit() for s in self.scores}
            out["per_unit"]["kurtosis"] = [float(v) for v in d["kurtosis"]]
            out["per_unit"]["active"] = [float(v) for v in d["active"]]
        if self.pair is not None:
            out["pair"] = {"against": self.compare, **self.pair}
        return out

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        t = Table(title=f"Purity of {self.model} / {self.layer} ({self.units} units, fan-in {self.fan_in}) "
                        f"on {self.dataset}, n = {self.n}", caption="PR: mean participation ratio; med: median; "
                        "wtd: weighted by the next layer's weight norms; gauss: a Gaussian vector's (n + 2) / 3")
        for c in ("basis", "atoms", "PR", "PR med", "PR wtd", "PR gauss", "top-1", "Hoyer", "Gini", "H-count"):
            t.add_column(c, justify="left" if c == "basis" else "right")
        for s in self.scores:
            m = s.summary()
            wpr = m["pr"].get("weighted_mean")
            t.add_row(s.basis, str(s.n_atoms), f"{m['pr']['mean']:.2f}", f"{m['pr']['median']:.2f}",
                      "-" if wpr is None else f"{wpr:.2f}", f"{m['pr_gaussian']:.1f}", f"{m['top1']['mean']:.3f}",
                      f"{m['hoyer']['mean']:.3f}", f"{m['gini']['mean']:.3f}", f"{m['entropy']['mean']:.2f}")
        d = self.to_dict()["diagnostics"]
        lines = [t, f"pre-activation kurtosis: mean {d['kurtosis']['mean']:.2f}, median {d['kurtosis']['median']:.2f} "
                    f"(Gaussian 3); active fraction: mean {d['active']['mean']:.3f}"]
        if self.pair is not None:
            p = self.pair
            lines.append(f"pair vs {self.compare}: ‖βw′‖ > ‖v‖ for {100 * p['fraction_beta_dominant']:.1f} % of units, "
                         f"median β {p['beta']['median']:.3f}, median cos {p['cosine']['median']:.3f}, "
                         f"relative change {p['relative_change']:.3f}, stable rank of ΔW {p['stable_rank_change']:.2f}")
        return Group(*lines)


def _resolve_basis(spec, patches: torch.Tensor, task: SparseCodingTask | None, layer_module: nn.Module,
                   n_atoms: int | None, seed: int) -> Basis:
    if isinstance(spec, Basis):
        return spec
    if torch.is_tensor(spec):
        return Basis("given", spec.float())
    if spec == "true":
        if task is None:
            raise InvalidInputError("--basis true needs synthetic data (the true dictionary is known only there); "
                             "for real data use ica, dict, random or a file")
        if not isinstance(layer_module, nn.Linear) or layer_module.in_features != task.d:
            raise InvalidInputError(f"the true basis has atoms of dimension {task.d}; it applies to the first Linear layer "
                             f"(fc1 of the synthetic MLP), which reads the features")
        return Basis("true", task.dictionary, {"synthetic": task.spec()})
    if spec in ("ica", "dict", "random"):
        return learn_basis(spec, patches, n_atoms=n_atoms, seed=seed)
    return load_basis_file(spec)


def purification_report(
    model: nn.Module,
    data,
    layer: str,
    *,
    basis="ica",
    n: int | None = 2000,
    n_patches: int = 20000,
    n_atoms: int | None = None,
    seed: int = 0,
    compare: nn.Module | None = None,
    model_name: str = "model",
    compare_name: str | None = None,
    data_root=None,
    split: str = "test",
) -> PurificationReport:
    """Purity of ``layer`` of ``model`` in ``basis`` beside the random orthonormal control.

    data: as :func:`load_images` (``n`` inputs of ``split``). basis: ``true`` (synthetic data),
    ``ica``, ``dict``, ``random``, a file path, a (D, n) tensor or a :class:`Basis`; learned bases
    come from up to ``n_patches`` patches of the layer's own inputs (``n_atoms`` atoms, default
    the fan-in). Learned bases are also shown beside ``random-white``, a random rotation in their
    whitened space. ``compare``: a second checkpoint of the same architecture (clean vs adversarial)
    for :func:`checkpoint_pair` (``model`` is w, ``compare`` is w′).
    """
    images, _, task = load_images(data, n, split, data_root)
    module = get_layer(model, layer)
    units = layer_units(module)
    patches = layer_input_patches(model, layer, images, n_patches, seed)
    chosen = _resolve_basis(basis, patches, task, module, n_atoms, seed)
    bases = [chosen]
    if chosen.name in ("ica", "dict"):
        bases.append(whitened_random_basis(patches, seed + 1))
    if chosen.name != "random":
        bases.append(random_orthonormal_basis(units.shape[1], seed + 1))
    weights = next_layer_weights(model, layer)
    scores = [purity_scores(units, b.atoms, name=b.name, unit_weights=weights) for b in bases]
    diagnostics = hook_diagnostics(model, images, [layer])[layer]
    pair = checkpoint_pair(module, get_layer(compare, layer)) if compare is not None else None
    dataset = task.spec() if task is not None else (data if isinstance(data, str) else "custom")
    return PurificationReport(model=model_name, layer=layer, dataset=str(dataset), n=len(images), units=units.shape[0],
                              fan_in=units.shape[1], scores=scores, bases=bases, diagnostics=diagnostics, pair=pair,
                              compare=compare_name, filters=module.weight.detach().cpu())


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, written atomically as PNG)
# --------------------------------------------------------------------------------------------
def plot_purity_histograms(groups: Mapping[str, PurityScores | Sequence[PurityScores] | PurificationReport], path, score: str = "pr",
                           title: str | None = None):
    """Histograms of a per-unit score (``pr``, ``top1``, ``hoyer``...): one panel per basis, one
    colour per model. groups: model label -> a report (all its bases), one PurityScores or a list of them."""
    per_basis: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for label, item in groups.items():
        items = item.scores if isinstance(item, PurificationReport) else item if isinstance(item, (list, tuple)) else [item]
        for s in items:
            per_basis.setdefault(s.basis, []).append((label, getattr(s, score).float()))
    if not per_basis:
        raise InvalidInputError("nothing to plot: give at least one report or set of scores")
    fig, axes = figure(1, len(per_basis), figsize=(3.6 * len(per_basis), 3.0), dpi=100, squeeze=False)
    for ax, (basis, rows) in zip(axes[0], per_basis.items()):
        lo = min(float(v.min()) for _, v in rows)
        hi = max(float(v.max()) for _, v in rows)
        bins = torch.linspace(lo, hi + 1e-9, 31).tolist()
        for i, (label, v) in enumerate(rows):
            ax.hist(v.numpy(), bins=bins, alpha=0.55, color=f"C{i}", label=f"{label} (mean {float(v.mean()):.1f})")
        ax.set_title(f"{basis} basis", fontsize=9)
        ax.set_xlabel({"pr": "participation ratio"}.get(score, score), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6.5)
    axes[0][0].set_ylabel("units", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_filters(layers: Mapping[str, torch.Tensor | nn.Module], path, max_units: int = 64):
    """The kernels of first layers as image grids, one row of panels per model.

    layers: label -> a Conv2d (or its weight, (U, C, kh, kw)); C = 1 is shown in grey, C = 3 as
    RGB (each kernel scaled to [0, 1]); a Linear of a square image (U, H·W) is shown as U images.
    """
    import math

    fig, axes = figure(1, len(layers), figsize=(3.4 * len(layers), 3.6), dpi=100, squeeze=False)
    for ax, (label, w) in zip(axes[0], layers.items()):
        w = (w.weight if isinstance(w, nn.Module) else w).detach().float().cpu()
        if w.dim() == 2:
            side = int(round(math.sqrt(w.shape[1])))
            if side * side != w.shape[1]:
                raise InvalidInputError(f"cannot show {label}: a Linear layer's rows must be square images, got {w.shape[1]} inputs")
            w = w.view(-1, 1, side, side)
        if w.dim() != 4 or w.shape[1] not in (1, 3):
            raise InvalidInputError(f"cannot show {label}: kernels must be (U, 1 or 3, kh, kw), got {tuple(w.shape)}")
        w = w[:max_units]
        lo = w.flatten(1).amin(1).view(-1, 1, 1, 1)
        hi = w.flatten(1).amax(1).view(-1, 1, 1, 1)
        w = (w - lo) / (hi - lo).clamp_min(1e-12)
        cols = int(math.ceil(math.sqrt(len(w))))
        rows = int(math.ceil(len(w) / cols))
        kh, kw = w.shape[2:]
        grid = torch.ones(rows * (kh + 1) - 1, cols * (kw + 1) - 1, w.shape[1])
        for i, k in enumerate(w):
            r, c = divmod(i, cols)
            grid[r * (kh + 1):r * (kh + 1) + kh, c * (kw + 1):c * (kw + 1) + kw] = k.permute(1, 2, 0)
        ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if w.shape[1] == 1 else None, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    return save_figure(fig, path)


def plot_purity_vs_eps(curves: Mapping[str, Sequence[tuple[float, float]]], path, *, xlabel: str = "training ε",
                       ylabel: str = "mean participation ratio", title: str | None = None,
                       reference: float | None = None):
    """Line plot of a purity score against ε: curves maps a label (basis) to (ε, score) points;
    ``reference`` draws a dashed horizontal line (e.g. the Gaussian PR (n + 2) / 3)."""
    fig, ax = figure(figsize=(5.2, 3.4), dpi=100)
    for i, (label, pts) in enumerate(curves.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=f"C{i}", ms=4, label=label)
    if reference is not None:
        ax.axhline(reference, ls="--", color="grey", lw=1, label=f"Gaussian ({reference:.1f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
