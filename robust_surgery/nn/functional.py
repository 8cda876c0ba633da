"""The NRPM math, in one place.

Nonlinear Robust Pattern Matching (NRPM) replaces the sum of the D product terms
``u_d = a_d * x_d`` of a Linear or Conv output unit (the *linear pattern match*, LPM) by a
robust location estimate of the same terms, computed by K steps of iteratively reweighted
least squares (IRLS), and mixes the two (``docs/design.md`` states it in words)::

    z0 = z_LPM = sum_d u_d
    repeat K times:
        dist_d  = |u_d - z / D|
        w_d     = reweight(dist_d)
        z       = D * sum_d w_d u_d / max(sum_d w_d, 1e-12)
    y = lam * z_LPM + (1 - lam) * z + bias

Everything here works on a common "grouped rows" shape: inputs ``x`` of shape ``(G, R, D)``
(G groups, R rows: batch items for Linear, batch items x output positions for Conv),
weights ``(G, O, D)``, outputs ``(G, R, O)``. The per-term tensor ``(G, R, O, D)`` is never
built whole: rows and outputs are processed in chunks whose size follows a memory budget,
and backward recomputes each chunk's terms instead of keeping them (applying the analytic
gradient of the unrolled iterations, derived in :mod:`robust_surgery.nn.backends.eager`, which runs
the chunks), so peak memory stays near one chunk's worth. Conv rows are unfolded a few batch
items at a time. ``ROBUST_SURGERY_NRPM_COMPILE=1`` runs the chunks through torch.compile.
"""
from __future__ import annotations

import dataclasses

import math
import os
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from robust_surgery.nn import backends
from robust_surgery.nn.backends import eager as _eager
from robust_surgery.errors import InvalidInputError

__all__ = [
    "NRPMSettings",
    "REWEIGHTS",
    "register_reweight",
    "reweight_names",
    "default_memory_budget",
    "robust_pattern_match",
    "nrpm_linear",
    "nrpm_conv",
    "conv_padding_pairs",
    "mix",
]

# --------------------------------------------------------------------------------------------
# Reweighting functions: dist (>= 0) -> weights (> 0), elementwise.
# --------------------------------------------------------------------------------------------
Reweight = Callable[..., torch.Tensor]
REWEIGHTS: dict[str, Reweight] = {}
REWEIGHT_DERIVATIVES: dict[str, Reweight] = {}  # norm name -> d weight / d dist (optional)


def register_reweight(name: str, derivative: Reweight | None = None) -> Callable[[Reweight], Reweight]:
    """Register ``fn(dist, *, eps, gamma, delta) -> weights`` under ``name`` (a norm name).

    ``dist`` is a non-negative tensor of any shape; the function returns positive weights of
    the same shape. Registered names become valid ``norm=`` values everywhere (layers,
    ``convert``, the CLI). ``derivative(dist, *, eps, gamma, delta)`` returns d weights / d dist
    elementwise (use 0 where a clamp is active, as torch's subgradient does); with it, backward
    uses the fast analytic gradient, without it backward recomputes each chunk under autograd.
    It can also be given later with ``@register_reweight_derivative(name)``.
    """

    def wrap(fn: Reweight) -> Reweight:
        REWEIGHTS[name] = fn
        if derivative is not None:
            REWEIGHT_DERIVATIVES[name] = derivative
        else:
            REWEIGHT_DERIVATIVES.pop(name, None)
        return fn

    return wrap


def register_reweight_derivative(name: str) -> Callable[[Reweight], Reweight]:
    """Decorator: register ``d weights / d dist`` for the already registered norm ``name``."""

    def wrap(fn: Reweight) -> Reweight:
        if name not in REWEIGHTS:
            raise InvalidInputError(f"unknown norm {name!r}: register the reweighting function first")
        REWEIGHT_DERIVATIVES[name] = fn
        return fn

    return wrap


def reweight_names() -> list[str]:
    """Names of every registered reweighting function (valid ``norm`` values)."""
    return list(REWEIGHTS)


# Each built-in φ(dist) with its derivative φ'(dist) (t = 1 / (dist + ε)). Where a clamp is
# active the derivative is 0, at an exact tie too (torch.clamp's subgradient: it passes the
# gradient only strictly inside the bounds), so the analytic backward equals autograd.
@register_reweight("L2")
def _reweight_l2(dist, *, eps, gamma, delta):
    # IRLS with constant weights returns the mean: NRPM with L2 equals the linear layer.
    return torch.ones_like(dist)


@register_reweight_derivative("L2")
def _dreweight_l2(dist, *, eps, gamma, delta):
    return torch.zeros_like(dist)


@register_reweight("L1")
def _reweight_l1(dist, *, eps, gamma, delta):
    # 1 / (dist + ε), written without extra term-sized temporaries (L1 is the hot path);
    # bit-identical to `1.0 / (dist + eps)`, which torch evaluates as reciprocal(dist + eps) * 1.0
    return torch.add(dist, eps).reciprocal_()


@register_reweight_derivative("L1")
def _dreweight_l1(dist, *, eps, gamma, delta):
    t = torch.add(dist, eps).reciprocal_()  # -1 / (dist + ε)²
    return t.mul_(t).neg_()


@register_reweight("MCP")
def _reweight_mcp(dist, *, eps, gamma, delta):
    return torch.clamp_min(1.0 / (dist + eps) - 1.0 / gamma, eps)


@register_reweight_derivative("MCP")
def _dreweight_mcp(dist, *, eps, gamma, delta):
    t = 1.0 / (dist + eps)
    return torch.where(t - 1.0 / gamma > eps, -t * t, torch.zeros_like(t))


@register_reweight("Huber")
def _reweight_huber(dist, *, eps, gamma, delta):
    return torch.clamp_max(delta / (dist + eps), 1.0)


@register_reweight_derivative("Huber")
def _dreweight_huber(dist, *, eps, gamma, delta):
    t = delta / (dist + eps)
    return torch.where(t < 1.0, -t * t / delta, torch.zeros_like(t))


@register_reweight("HM")
def _reweight_hm(dist, *, eps, gamma, delta):
    return torch.clamp(delta / (gamma - delta) * (gamma / (dist + eps) - 1.0), eps, 1.0)


@register_reweight_derivative("HM")
def _dreweight_hm(dist, *, eps, gamma, delta):
    t = 1.0 / (dist + eps)
    c = delta / (gamma - delta)
    v = c * (gamma * t - 1.0)
    return torch.where((v > eps) & (v < 1.0), -(c * gamma) * t * t, torch.zeros_like(t))


NORM_CODES = {"L2": 0, "L1": 1, "MCP": 2, "Huber": 3, "HM": 4}  # the fused kernels' numbering
_BUILTIN = {
    "L2": (_reweight_l2, _dreweight_l2),
    "L1": (_reweight_l1, _dreweight_l1),
    "MCP": (_reweight_mcp, _dreweight_mcp),
    "Huber": (_reweight_huber, _dreweight_huber),
    "HM": (_reweight_hm, _dreweight_hm),
}


def builtin_norm_code(norm: str) -> int | None:
    """The fused kernels' code of ``norm`` while it is registered with its built-in φ and φ', else None.

    The fused kernels (C on CPU, Triton on GPU) hard-code the built-in functions; a norm
    re-registered by the user runs the eager path.
    """
    builtin = _BUILTIN.get(norm)
    if builtin is None or (REWEIGHTS.get(norm), REWEIGHT_DERIVATIVES.get(norm)) != builtin:
        return None
    return NORM_CODES[norm]


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
from robust_surgery.limits import LIMITS

MAX_K = LIMITS["K"]  # IRLS steps: the estimate settles in a handful (the paper uses K <= 5); more is a mistake or an attack


@dataclass(frozen=True)
class NRPMSettings:
    """The knobs of one NRPM layer.

    norm: reweighting function name (``L2``, ``L1``, ``MCP``, ``Huber``, ``HM`` or registered).
    K: number of IRLS steps (int, 0 to ``MAX_K`` = 100; each costs one pass over the terms). eps: the small constant ε > 0 in the weights.
    gamma, delta: the thresholds γ, δ of ``MCP``/``Huber``/``HM`` (in the units of the terms).
    """

    norm: str = "L1"
    K: int = 3
    eps: float = 1e-3
    gamma: float = 4.0
    delta: float = 3.0

    def __post_init__(self):
        if self.norm not in REWEIGHTS:
            raise InvalidInputError(
                f"unknown norm {self.norm!r}: choose one of {', '.join(REWEIGHTS)} "
                "(or add one with robust_surgery.register_reweight)"
            )
        if isinstance(self.K, bool) or not isinstance(self.K, int) or not 0 <= self.K <= MAX_K:
            raise InvalidInputError(f"K (IRLS steps) must be a whole number from 0 to {MAX_K}, got {self.K!r} "
                                    "(the estimate settles within a few steps; the paper uses K <= 5)")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0 and math.isfinite(self.eps)):
            raise InvalidInputError(f"eps must be a positive finite number, got {self.eps!r}")
        if not self.gamma > 0 or not self.delta > 0:
            raise InvalidInputError(f"gamma and delta must be positive, got gamma={self.gamma}, delta={self.delta}")
        if self.norm == "HM" and not self.gamma > self.delta:
            raise InvalidInputError(f"norm 'HM' needs gamma > delta, got gamma={self.gamma}, delta={self.delta}")

    @property
    def is_linear(self) -> bool:
        """True when NRPM equals the plain layer whatever λ (norm L2, or no IRLS step)."""
        return self.norm == "L2" or self.K == 0

    def reweight(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The reweighting function with this layer's ε, γ, δ bound."""
        return partial(REWEIGHTS[self.norm], eps=self.eps, gamma=self.gamma, delta=self.delta)

    def reweight_derivative(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """d weight / d dist with ε, γ, δ bound, or None when the norm registered none."""
        fn = REWEIGHT_DERIVATIVES.get(self.norm)
        return None if fn is None else partial(fn, eps=self.eps, gamma=self.gamma, delta=self.delta)

    def to_dict(self) -> dict:
        return asdict(self)


#: The default settings (``convert``, the CLI and the layers take theirs from here).
DEFAULTS = NRPMSettings()
#: λ of a freshly converted layer by default (0.5: half the original layer, half NRPM).
DEFAULT_LAM = 0.5
#: The names of the per-layer knobs: NRPMSettings' fields, and λ.
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(NRPMSettings))
LAYER_SETTING_NAMES = (*SETTING_NAMES, "lam")


# --------------------------------------------------------------------------------------------
# Memory budget and chunking
# --------------------------------------------------------------------------------------------
_DEFAULT_BUDGET = 256 * 2**20


def default_memory_budget() -> int:
    """Bytes one chunk of NRPM terms may use: env ``ROBUST_SURGERY_NRPM_BUDGET_MB`` or 256 MiB."""
    mb = os.environ.get("ROBUST_SURGERY_NRPM_BUDGET_MB")
    if mb is None:
        return _DEFAULT_BUDGET
    try:
        value = int(float(mb) * 2**20)
    except ValueError:
        raise InvalidInputError(f"ROBUST_SURGERY_NRPM_BUDGET_MB must be a number of MiB, got {mb!r}") from None
    if value <= 0:
        raise InvalidInputError(f"ROBUST_SURGERY_NRPM_BUDGET_MB must be positive, got {mb!r}")
    return value


def _chunk_sizes(G: int, R: int, O: int, D: int, K: int, itemsize: int, budget: int) -> tuple[int, int]:
    """Rows and outputs per chunk so that the live term tensors of one chunk fit the budget."""
    return _eager.chunk_sizes(G, R, O, D, itemsize, budget)


def _budget(memory_budget: int | None) -> int:
    return default_memory_budget() if memory_budget is None else int(memory_budget)


def robust_pattern_match(
    x: torch.Tensor,
    w: torch.Tensor,
    z0: torch.Tensor,
    settings: NRPMSettings,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """The robust estimate z_NRPM of every output, chunked under a memory budget.

    x: (G, R, D) inputs, w: (G, O, D) weights, z0: (G, R, O) the linear outputs z_LPM (no bias)
    the iteration starts from. Returns (G, R, O). ``memory_budget`` (bytes) bounds the terms of
    one chunk. Gradients reach x, w and z0: backward recomputes each chunk's terms and applies
    the analytic gradient of the unrolled iterations (autograd on the chunk for a reweighting
    function registered without derivative). First-order only: no double backward.
    """
    G, R, D = x.shape
    O = w.shape[1]
    rows, outs = _chunk_sizes(G, R, O, D, settings.K, x.element_size(), _budget(memory_budget))
    src = _eager.DenseRows(x)
    return backends.run(src, x, w, z0, settings, settings.reweight(), settings.reweight_derivative(), rows, outs)


def mix(lam, z_lpm: torch.Tensor, z_nrpm: torch.Tensor) -> torch.Tensor:
    """The hybrid ``lam * z_lpm + (1 - lam) * z_nrpm`` (λ a float or a 0-dim tensor). Only a Python
    number is looked at (λ = 0 returns z_nrpm): a tensor's value is never read here, so the
    function traces under torch.export and runs on the meta device."""
    if not torch.is_tensor(lam) and lam == 0:
        return z_nrpm
    return lam * z_lpm + (1 - lam) * z_nrpm


def _is_exactly_one(lam) -> bool:
    """λ == 1 for a Python number (the NRPM term is skipped); a tensor's value is not read (see mix)."""
    return not torch.is_tensor(lam) and lam == 1


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _low_precision(x: torch.Tensor):
    """The half-precision dtype the NRPM output should have, or None to compute as is.

    The reweighting's weights reach 1/ε and their sums D/ε (5e5 for D = 512, ε = 1e-3): beyond
    float16's range (6.5e4), so half-precision inputs (or autocast to half precision) run the IRLS in
    float32, autocast off, and the result is cast back; never silent inf/NaN."""
    if x.dtype in _LOW_PRECISION:
        return x.dtype
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in _LOW_PRECISION:
        return torch.get_autocast_dtype(device)
    return None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    if bias is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y + bias.view(shape)


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------
def nrpm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    lam=DEFAULT_LAM,
    settings: NRPMSettings = NRPMSettings(),
    memory_budget: int | None = None,
) -> torch.Tensor:
    """NRPM version of ``F.linear``. x: (*, D), weight: (O, D), bias: (O,) -> (*, O).

    ``lam`` is λ in [0, 1] (float or 0-dim tensor); λ = 1, norm ``L2`` or K = 0 give
    ``F.linear`` itself.
    """
    if settings.is_linear or _is_exactly_one(lam):
        return F.linear(x, weight, bias)
    low = _low_precision(x)
    if low is not None:
        with torch.autocast(x.device.type, enabled=False):
            return nrpm_linear(x.float(), weight.float(), _f32(bias), lam, settings, memory_budget).to(low)
    lead = x.shape[:-1]
    D = x.shape[-1]
    rows = x.reshape(1, -1, D)
    z_lpm = F.linear(rows, weight)  # (1, N, O)
    z = robust_pattern_match(rows, weight.unsqueeze(0), z_lpm, settings, memory_budget)
    y = _add_bias(mix(lam, z_lpm, z), bias, -1)
    return y.reshape(*lead, weight.shape[0])


# --------------------------------------------------------------------------------------------
# Convolution (any number of spatial dims), by unfolding
# --------------------------------------------------------------------------------------------
def _ntuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_padding_pairs(padding, kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """Padding amounts in ``F.pad`` order (last dim first, (left, right) each), as torch's ConvNd.

    ``padding`` is an int, a tuple of ints, ``'valid'`` or ``'same'`` (an odd total pads one
    more on the right, as torch does).
    """
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * (2 * n)
        if padding == "same":
            pairs = []
            for k, d in zip(reversed(kernel), reversed(dilation)):
                total = d * (k - 1)
                pairs += [total // 2, total - total // 2]
            return pairs
        raise InvalidInputError(f"padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
    pads = _ntuple(padding, n)
    return [p for p in reversed(pads) for _ in range(2)]


def nrpm_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    lam=DEFAULT_LAM,
    settings: NRPMSettings = NRPMSettings(),
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
    z_lpm: torch.Tensor | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """NRPM version of ``F.conv{1,2,3}d``. x: (B, C, *S), weight: (O, C/groups, *k) -> (B, O, *L).

    Padding positions take part in the robust estimate as terms (zeros for ``padding_mode``
    'zeros', reflected/replicated/circular values otherwise), as the reference does. ``z_lpm``
    may pass the already computed bias-free linear output (B, O, *L) to avoid recomputing it.
    """
    n = weight.dim() - 2
    if x.dim() != n + 2:
        raise InvalidInputError(f"a {n}-d convolution needs input of shape (B, C, {n} spatial dims), got {tuple(x.shape)}")
    kernel = tuple(weight.shape[2:])
    stride, dilation = _ntuple(stride, n), _ntuple(dilation, n)
    pads = conv_padding_pairs(padding, kernel, dilation)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    xp = F.pad(x, pads, mode=mode) if any(pads) else x
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    if settings.is_linear or _is_exactly_one(lam):
        return conv(xp, weight, bias, stride, 0, dilation, groups)
    low = _low_precision(x)
    if low is not None:
        with torch.autocast(x.device.type, enabled=False):
            return nrpm_conv(x.float(), weight.float(), _f32(bias), lam, settings, stride=stride, padding=padding,
                             dilation=dilation, groups=groups, padding_mode=padding_mode, z_lpm=_f32(z_lpm),
                             memory_budget=memory_budget).to(low)
    if z_lpm is None:
        z_lpm = conv(xp, weight, None, stride, 0, dilation, groups)
    B, O = x.shape[0], weight.shape[0]
    L = z_lpm.shape[2:]
    Lp = math.prod(L)
    G = groups
    Og, Dg = O // G, weight[0].numel()
    budget = _budget(memory_budget)
    items = _eager.conv_items(B, Lp, x.shape[1], math.prod(kernel), xp.element_size(), budget)
    src = _eager.ConvRows(xp, kernel, stride, dilation, G, L, items)  # unfolds a few items at a time
    rows, outs = _chunk_sizes(G, src.block_rows, Og, Dg, settings.K, xp.element_size(), budget)
    z0 = z_lpm.reshape(B, G, Og, Lp).permute(1, 0, 3, 2).reshape(G, B * Lp, Og)
    z = backends.run(src, xp, weight.reshape(G, Og, Dg), z0, settings, settings.reweight(),
                     settings.reweight_derivative(), rows, outs)
    z_nrpm = z.reshape(G, B, Lp, Og).permute(1, 0, 3, 2).reshape(B, O, *L)
    return _add_bias(mix(lam, z_lpm, z_nrpm), bias, 1)
