"""Fast execution of the NRPM IRLS: chunked forward, analytic chunked backward.

The math is stated (and kept readable) in :mod:`robust_surgery.nn.functional` and
``docs/design.md``; this module only runs it fast and within a memory budget.

Per output unit, with terms ``u_d = x_d a_d``, ``c_k = z_k / D``, ``r_d = u_d - c_k``,
``s_d = sign(r_d)``, ``w_d = φ(|r_d|)``, ``S = Σ w_d`` and ``z_{k+1} = D Σ w_d u_d / max(S, 1e-12)``,
the vector-Jacobian product of one IRLS step is (``m = [S > 1e-12]``: torch's clamp subgradient, 0 at a tie)::

    a_d             = φ'(|r_d|) · s_d · (u_d − m · z_{k+1} / D)
    ∂z_{k+1}/∂u_d   = (D / max(S, 1e-12)) · (w_d + a_d)
    ∂z_{k+1}/∂z_k   = −(1 / max(S, 1e-12)) · Σ_d a_d

Backward walks k = K−1 … 0 from the saved per-output iterates z_1..z_K and sums S_0..S_{K−1}
(each (G, R, O), small), recomputing the (chunk of) terms; the term gradient ``g_u`` then
reduces to ``g_x[r, d] = Σ_o g_u[r, o, d] a[o, d]`` and ``g_a[o, d] = Σ_r g_u[r, o, d] x[r, d]``.
Nothing of term size is kept between chunks. Reweighting functions without a registered
derivative fall back to recomputing the chunk under autograd.

Rows come from a *row source*: a ready ``(G, R, D)`` tensor (Linear) or a padded conv input
unfolded a few batch items at a time (Conv), so the whole unfolded input never exists and the
input gradient is folded back item block by item block.

Layouts: the term tensor of a chunk is ``(G, r, o, D)`` ("D last", reductions over contiguous
memory) or, when D is small (depthwise convs, the first conv of a network), ``(D, G, r, o)``
("D first": the D-reductions become adds of whole contiguous slabs).
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Callable

import torch

from robust_surgery.nn.backends.base import Switch, new_counter

S_MIN = 1e-12  # the release's max(Σ w, 1e-12)
_LIVE = 8  # term-sized tensors alive at peak in one chunk (backward: u, g_u, r, s, w, φ', a, temp)
_CACHE_TERMS = 1 << 17  # terms per chunk tensor that keep a chunk's working set near the L2/L3 caches
D_FIRST_BELOW = 32  # use the D-first layout for D below this

# Optional torch.compile of the chunk functions (inductor fuses the broadcast product, the
# elementwise work and the reductions, so the term tensors are mostly never written). Off by
# default: compiling costs ~10-30 s per configuration on first use (cached on disk afterwards).
# Turn on with ROBUST_SURGERY_NRPM_COMPILE=1 or use_compile(True); any failure falls back to eager.
compile_switch = Switch("ROBUST_SURGERY_NRPM_COMPILE", default=False)
_compiled: dict = {}

# The backend interface (robust_surgery.nn.backends.base): the eager path runs everything, always.
NAME = "eager"
switch = Switch("ROBUST_SURGERY_NRPM_EAGER", default=True)  # informational: eager cannot be switched off
calls = new_counter()  # chunk-function calls


def available() -> bool:
    """Always True: the eager chunks are plain torch."""
    return True


def enabled() -> bool:
    """Always True: the eager path is the fallback of every other backend."""
    return True


def supports(settings, x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor) -> bool:
    """Always True: any dtype, device, norm (with or without a registered derivative) and size."""
    return True


def disable(err: Exception) -> None:
    """The eager path has nothing to fall back to: re-raise ``err``."""
    raise err


def use_compile(enabled: bool = True) -> None:
    """Option of the eager backend: run its chunk functions through ``torch.compile`` (True) or not (False)."""
    compile_switch.set(enabled)


def compile_enabled() -> bool:
    """Whether the compiled chunk functions are used (``use_compile`` or ROBUST_SURGERY_NRPM_COMPILE)."""
    return compile_switch()


def _call(fn, *args):
    """fn(*args), through its compiled version when enabled; eager on any compile/runtime failure."""
    if not compile_enabled() or torch.is_grad_enabled():
        return fn(*args)
    cfn = _compiled.get(fn)
    if cfn is None:
        cfn = _compiled[fn] = torch.compile(fn, dynamic=True)
    try:
        # no "duck" shapes: chunk sizes and view offsets that coincide by chance must not
        # become guards, or every chunk position would recompile (and hit dynamo's limit)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return cfn(*args)
    except Exception as err:  # noqa: BLE001 - any inductor/toolchain failure: run eagerly from now on
        warnings.warn(f"NRPM: torch.compile failed ({type(err).__name__}: {err}); running eagerly", RuntimeWarning)
        use_compile(False)
        return fn(*args)


# --------------------------------------------------------------------------------------------
# Row sources
# --------------------------------------------------------------------------------------------
class DenseRows:
    """Rows given whole: x (G, R, D)."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.G, self.R, self.D = x.shape
        self.block_rows = self.R

    def blocks(self):
        yield 0, self.R

    def block(self, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        return x[:, r0:r1]

    def grad_zeros(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def add_grad(self, gx: torch.Tensor, r0: int, r1: int, g: torch.Tensor) -> None:
        gx[:, r0:r1] += g


class ConvRows:
    """Rows of a convolution read from the padded input xp (B, C, *S), a few batch items at a time.

    Row ``b * L + l`` (L output positions) of group ``g`` holds the ``D = C/G · prod(kernel)``
    patch values of item b at output position l, in the order of ``weight[o].flatten()``.
    """

    def __init__(self, xp: torch.Tensor, kernel, stride, dilation, groups: int, out_sizes, items: int):
        self.xp = xp
        self.kernel, self.stride, self.dilation = tuple(kernel), tuple(stride), tuple(dilation)
        self.B, self.C = xp.shape[:2]
        self.G = groups
        self.L = tuple(out_sizes)
        self.Lp = math.prod(self.L)
        self.D = self.C // groups * math.prod(self.kernel)
        self.R = self.B * self.Lp
        self.items = max(1, min(self.B, items))
        self.block_rows = self.items * self.Lp

    def blocks(self):
        for b0 in range(0, self.B, self.items):
            yield b0 * self.Lp, min(self.B, b0 + self.items) * self.Lp

    def _unfold(self, xp):
        n = len(self.kernel)
        cols = xp
        for i in range(n):
            span = self.dilation[i] * (self.kernel[i] - 1) + 1
            cols = cols.unfold(2 + i, span, self.stride[i])
            if self.dilation[i] > 1:
                cols = cols[..., :: self.dilation[i]]
        order = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
        return cols.permute(order)  # (b, *L, C, *kernel)

    def block(self, xp: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        b0, b1 = r0 // self.Lp, r1 // self.Lp
        cols = self._unfold(xp[b0:b1]).reshape((b1 - b0) * self.Lp, self.G, self.D)
        return cols.transpose(0, 1).contiguous()  # (G, rows, D)

    def grad_zeros(self, xp: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(xp)

    def add_grad(self, gxp: torch.Tensor, r0: int, r1: int, g: torch.Tensor) -> None:
        """Fold the row gradient g (G, rows, D) of items b0:b1 back onto the padded input."""
        b0, b1 = r0 // self.Lp, r1 // self.Lp
        gcols = g.transpose(0, 1).reshape(b1 - b0, *self.L, self.C, *self.kernel)
        target = gxp[b0:b1]
        n = len(self.kernel)
        for idx in itertools.product(*[range(k) for k in self.kernel]):
            sl = tuple(
                slice(idx[i] * self.dilation[i], idx[i] * self.dilation[i] + self.stride[i] * (self.L[i] - 1) + 1,
                      self.stride[i])
                for i in range(n)
            )
            target[(slice(None), slice(None), *sl)] += gcols[(Ellipsis, *idx)].movedim(-1, 1)


# --------------------------------------------------------------------------------------------
# Chunk sizes
# --------------------------------------------------------------------------------------------
def chunk_sizes(G: int, R: int, O: int, D: int, itemsize: int, budget: int) -> tuple[int, int]:
    """Rows and outputs per chunk: ``_LIVE`` term tensors of G·rows·outs·D fit the budget,
    and one term tensor stays near the cache-friendly size."""
    elems = max(1, min(budget // (itemsize * _LIVE), max(_CACHE_TERMS, G * D)))
    per_row = G * O * D
    if per_row <= elems:
        return max(1, min(R, elems // per_row)), O
    return 1, max(1, min(O, elems // (G * D)))


def conv_items(B: int, Lp: int, C: int, kprod: int, itemsize: int, budget: int) -> int:
    """Batch items unfolded at once: the unfolded block (and its gradient) within a quarter budget."""
    per_item = Lp * C * kprod * itemsize * 3  # unfolded rows, contiguous copy, gradient
    return max(1, min(B, (budget // 4) // max(1, per_item)))


# --------------------------------------------------------------------------------------------
# One chunk
# --------------------------------------------------------------------------------------------
def _terms(x, w, d_first: bool):
    """x (G, r, D), w (G, o, D) -> terms (D, G, r, o) if d_first else (G, r, o, D)."""
    if d_first:
        return x.permute(2, 0, 1).unsqueeze(-1) * w.permute(2, 0, 1).unsqueeze(2)
    return x.unsqueeze(2) * w.unsqueeze(1)


def forward_chunk(x, w, z0, K: int, reweight, d_first: bool, keep: bool):
    """K IRLS steps on one chunk. x (G,r,D), w (G,o,D), z0 (G,r,o) -> z_K, [z_1..z_K], [S_0..S_{K-1}]."""
    dim = 0 if d_first else -1
    D = x.shape[-1]
    u = _terms(x, w, d_first)
    z = z0
    zs, sums = [], []
    for _ in range(K):
        r = u - (z / D).unsqueeze(dim)
        dist = r.abs() if torch.is_grad_enabled() else r.abs_()
        del r
        wt = reweight(dist)
        del dist
        S = wt.sum(dim)
        z = D * (wt * u).sum(dim) / S.clamp_min(S_MIN)
        del wt
        if keep:
            zs.append(z)
            sums.append(S)
    return z, zs, sums


def backward_chunk(x, w, z0, zs, sums, g, K: int, reweight, dreweight, d_first: bool,
                   need_x: bool, need_w: bool):
    """Analytic VJP of :func:`forward_chunk`. g (G,r,o) = dL/dz_K -> (g_x (G,r,D), g_w (G,o,D), g_z0)."""
    dim = 0 if d_first else -1
    D = x.shape[-1]
    u = _terms(x, w, d_first)
    gu = None
    for k in reversed(range(K)):
        zk = z0 if k == 0 else zs[k - 1]
        S = sums[k]
        Sc = S.clamp_min(S_MIN)
        zn = torch.where(S > S_MIN, zs[k] / D, torch.zeros_like(Sc))  # clamp active: z_{k+1} term drops
        r = u - (zk / D).unsqueeze(dim)
        s = r.sign()
        dist = r.abs_()
        wt = reweight(dist)
        a = dreweight(dist) * s
        del s, dist, r
        a.mul_(u - zn.unsqueeze(dim))
        gs = (g * D / Sc).unsqueeze(dim)
        if gu is None:
            gu = (wt + a).mul_(gs)
        else:
            gu.addcmul_(wt + a, gs)
        del wt
        g = -(g / Sc) * a.sum(dim)
        del a
    del u
    gx = gw = None
    if d_first:  # gu (D, G, r, o)
        if need_x:
            gx = torch.matmul(gu, w.permute(2, 0, 1).unsqueeze(-1)).squeeze(-1).permute(1, 2, 0)
        if need_w:
            gw = torch.matmul(x.permute(2, 0, 1).unsqueeze(2), gu).squeeze(2).permute(1, 2, 0)
    else:  # gu (G, r, o, D)
        if need_x:
            gx = (gu * w.unsqueeze(1)).sum(2)
        if need_w:
            gw = (gu * x.unsqueeze(2)).sum(1)
    return gx, gw, g


def _chunks(R0: int, R1: int, O: int, rows: int, outs: int):
    for r0 in range(R0, R1, rows):
        for o0 in range(0, O, outs):
            yield r0, min(R1, r0 + rows), slice(o0, o0 + outs)


def _count(direction: str) -> None:
    """Count a chunk call, except while torch.compile traces (a counter is a side effect it refuses)."""
    if not torch.compiler.is_compiling():
        calls[direction] += 1


def forward(*args):
    """One eager (optionally compiled) forward chunk; the arguments of :func:`forward_chunk`."""
    _count("forward")
    return _call(forward_chunk, *args)


def backward(*args):
    """One eager (optionally compiled) backward chunk; the arguments of :func:`backward_chunk`."""
    _count("backward")
    return _call(backward_chunk, *args)


def irls_forward(src, x, w, z0, K: int, reweight, rows: int, outs: int, keep: bool, d_first: bool,
                 fwd: Callable = forward):
    """Chunked forward over a row source. Returns z_K (G,R,O) and, if keep, stacked z_1..z_K, S_0..S_{K-1}.

    ``fwd`` runs one chunk (signature of :func:`forward_chunk`): eager, or the fused Triton kernel.
    """
    G, O = w.shape[0], w.shape[1]
    R = z0.shape[1]
    out = torch.empty(G, R, O, dtype=z0.dtype, device=z0.device)
    zs_all = torch.empty(K, G, R, O, dtype=z0.dtype, device=z0.device) if keep else None
    s_all = torch.empty(K, G, R, O, dtype=z0.dtype, device=z0.device) if keep else None
    for b0, b1 in src.blocks():
        xb = src.block(x, b0, b1)
        for r0, r1, o in _chunks(b0, b1, O, rows, outs):
            z, zs, sums = fwd(xb[:, r0 - b0:r1 - b0], w[:, o], z0[:, r0:r1, o], K, reweight, d_first, keep)
            out[:, r0:r1, o] = z
            if keep:
                for k in range(K):
                    zs_all[k, :, r0:r1, o] = zs[k]
                    s_all[k, :, r0:r1, o] = sums[k]
        del xb
    return out, zs_all, s_all


class RobustPatternMatchFn(torch.autograd.Function):
    """Chunked IRLS; backward recomputes each chunk's terms and applies the analytic VJP
    (or, for a reweighting function without a derivative, autograd on the recomputed chunk)."""

    @staticmethod
    def forward(ctx, x, w, z0, src, settings, reweight, dreweight, rows, outs, d_first, chunk_fns):
        out, zs, sums = irls_forward(src, x, w, z0, settings.K, reweight, rows, outs,
                                     keep=dreweight is not None, d_first=d_first, fwd=chunk_fns[0])
        ctx.save_for_backward(x, w, z0, *(() if zs is None else (zs, sums)))
        ctx.src, ctx.K, ctx.reweight, ctx.dreweight = src, settings.K, reweight, dreweight
        ctx.rows, ctx.outs, ctx.d_first, ctx.bwd = rows, outs, d_first, chunk_fns[1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, z0, *saved = ctx.saved_tensors
        zs_all, s_all = saved if saved else (None, None)
        gx, gw, gz0 = irls_backward(ctx.src, x, w, z0, zs_all, s_all, grad_out, ctx.K, ctx.reweight, ctx.dreweight,
                                    ctx.rows, ctx.outs, ctx.d_first, *ctx.needs_input_grad[:3], bwd=ctx.bwd)
        return gx, gw, gz0, None, None, None, None, None, None, None, None


def irls_backward(src, x, w, z0, zs_all, s_all, grad_out, K: int, reweight, dreweight, rows: int, outs: int,
                  d_first: bool, need_x: bool, need_w: bool, need_z0: bool, bwd: Callable = backward):
    """Chunked VJP of :func:`irls_forward`: grad_out (G, R, O) = dL/dz_K -> (g_x shaped like x, g_w, g_z0),
    each None when not needed. ``zs_all``/``s_all``: what the forward kept (K, G, R, O); None when the
    reweighting has no registered derivative (each chunk is then recomputed under autograd).
    ``bwd`` runs one chunk (signature of :func:`backward_chunk`): eager, or the fused Triton kernel."""
    gx = src.grad_zeros(x) if need_x else None
    gw = torch.zeros_like(w) if need_w else None
    gz0 = torch.zeros_like(z0) if need_z0 else None
    O = w.shape[1]
    for b0, b1 in src.blocks():
        xb = src.block(x, b0, b1)
        gxb = torch.zeros_like(xb) if need_x else None
        for r0, r1, o in _chunks(b0, b1, O, rows, outs):
            xc, wc, zc = xb[:, r0 - b0:r1 - b0], w[:, o], z0[:, r0:r1, o]
            gc = grad_out[:, r0:r1, o]
            if dreweight is not None:
                gxc, gwc, gzc = bwd(xc, wc, zc, [zs_all[k, :, r0:r1, o] for k in range(K)],
                                    [s_all[k, :, r0:r1, o] for k in range(K)], gc, K, reweight, dreweight,
                                    d_first, need_x, need_w)
            else:
                gxc, gwc, gzc = _autograd_chunk(xc, wc, zc, gc, K, reweight, d_first, need_x, need_w)
            if need_x:
                gxb[:, r0 - b0:r1 - b0] += gxc
            if need_w:
                gw[:, o] += gwc
            if need_z0:
                gz0[:, r0:r1, o] = gzc
        if need_x:
            src.add_grad(gx, b0, b1, gxb)
        del xb, gxb
    return gx, gw, gz0


def _autograd_chunk(x, w, z0, g, K, reweight, d_first, need_x, need_w):
    """Fallback VJP: recompute the chunk under autograd (reweighting functions without derivative)."""
    with torch.enable_grad():
        xc = x.detach().requires_grad_(need_x)
        wc = w.detach().requires_grad_(need_w)
        zc = z0.detach().requires_grad_(True)
        out, _, _ = forward_chunk(xc, wc, zc, K, reweight, d_first, keep=False)
        wanted = [t for t in (xc, wc, zc) if t.requires_grad]  # x or w may need none (a frozen layer, the input)
        grads = iter(torch.autograd.grad(out, wanted, g, allow_unused=True))
    gx = next(grads) if need_x else None
    gw = next(grads) if need_w else None
    return gx, gw, next(grads)


def run(src, x, w, z0, settings, reweight, dreweight, rows: int, outs: int, chunk_fns=None) -> torch.Tensor:
    """z_NRPM (G, R, O) of a row source, in chunks of ``rows`` × ``outs``; differentiable in x, w and z0.

    ``chunk_fns`` (forward_chunk, backward_chunk) default to the eager ones; the Triton backend
    passes its fused pair and one chunk per row block.
    """
    chunk_fns = chunk_fns or (forward, backward)
    d_first = src.D < D_FIRST_BELOW
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or z0.requires_grad):
        return RobustPatternMatchFn.apply(x, w, z0, src, settings, reweight, dreweight, rows, outs, d_first,
                                          chunk_fns)
    with torch.no_grad():
        return irls_forward(src, x, w, z0, settings.K, reweight, rows, outs, keep=False, d_first=d_first,
                            fwd=chunk_fns[0])[0]
