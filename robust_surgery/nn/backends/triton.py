"""Fused Triton kernels for the NRPM IRLS (forward and analytic backward), used for CUDA tensors.

The math is stated in :mod:`robust_surgery.nn.functional` (reweighting functions φ and their
derivatives φ', the IRLS step) and its vector-Jacobian product in :mod:`robust_surgery.nn.backends.eager`;
these kernels compute exactly that, without any term-sized tensor in memory:

* forward: one program per tile of (``BR`` rows × ``BO`` outputs) of one group runs the K IRLS
  steps. Each thread keeps Σ w and Σ w u of its (row, output) pairs in registers and walks
  d = 0 … D−1: it loads one x value per row and one weight per output, forms the product terms
  ``u = x_d a_d``, reweights them and accumulates; no term leaves a register and no reduction
  crosses threads. It writes z_K and, when backward will follow, the per-output iterates
  z_1..z_K and sums S_0..S_{K-1} (the eager path saves the same).
* backward: the same tiling walks k = K−1 … 0, recomputing each step's terms from x, the
  weights and the saved iterates; for each d it adds the term gradient's two reductions
  ``g_x[r, d] = Σ_o g_u a`` and ``g_a[o, d] = Σ_r g_u x`` into the outputs with atomic adds;
  the gradient with respect to z_0 is written directly.
* float32 reciprocals use ``rcp.approx.ftz`` (relative error below 2⁻²²; ``/`` would cost nine
  more instructions per term for range checks); float64 divides exactly.

Tile sizes come from the static report of ``benchmarks/triton_aot.py``, which compiles
these kernels for sm_90 without a GPU and counts SASS instructions per term.

Supported: the built-in norms ``L2``, ``L1``, ``MCP``, ``Huber`` and ``HM`` (only while their
registered functions are the built-in ones), any K ≥ 1, ε, γ, δ, float32 and float64 (the
scalars ε, γ, δ are passed as a tensor of the data's dtype, so float64 keeps full precision).
Everything else (other dtypes, custom norms, empty inputs) runs the eager chunked path.

Dispatch (from :func:`robust_surgery.nn.backends.run`): CUDA tensors use the compiled kernels
when Triton imports; with ``TRITON_INTERPRET=1`` in the environment *before this module is
imported*, CPU tensors run the kernels in Triton's interpreter (slow; for verification, see
tests/nn/test_nrpm_triton.py). ``ROBUST_SURGERY_NRPM_TRITON=0`` or ``use_backend("triton", False)``
turns the path off; a kernel that fails to compile or launch warns once and falls back to
the eager path.
"""
from __future__ import annotations

from typing import Callable

import torch

try:  # Triton is optional: without it every tensor runs the eager path
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure (missing, broken toolchain) means "unavailable"
    triton = None
    tl = None

from robust_surgery.nn.functional import NORM_CODES, builtin_norm_code
from robust_surgery.nn.backends.base import Switch, new_counter
from robust_surgery.nn.backends.eager import S_MIN  # the release's max(Σ w, 1e-12)

DTYPES = (torch.float32, torch.float64)

NAME = "triton"
switch = Switch("ROBUST_SURGERY_NRPM_TRITON", default=True)
calls = new_counter()  # kernel launches in this process (tests check dispatch)


def enabled() -> bool:
    """Whether the Triton path may be used (``use_backend("triton", ...)`` or env ROBUST_SURGERY_NRPM_TRITON, default on)."""
    return switch() and available()


def available() -> bool:
    """True when Triton imported (its kernels can be built)."""
    return triton is not None


def interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import): CPU tensors work."""
    return triton is not None and type(_irls_fwd_kernel).__name__ == "InterpretedFunction"


def supports(settings, x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor) -> bool:
    """Whether the fused kernels can run this problem: x (G, R, D), w (G, O, D), z0 (G, R, O).

    Needs Triton, the path enabled, CUDA tensors (or CPU tensors in interpreter mode), float32
    or float64, a non-empty problem, K ≥ 1 and a built-in norm.
    """
    if triton is None or not enabled():
        return False
    if x.device.type != "cuda" and not (interpreted() and x.device.type == "cpu"):
        return False
    if x.dtype not in DTYPES or w.dtype != x.dtype or z0.dtype != x.dtype:
        return False
    if x.numel() == 0 or w.numel() == 0 or settings.K < 1:
        return False
    return builtin_norm_code(settings.norm) is not None


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
if triton is not None:
    _S_MIN = tl.constexpr(S_MIN)

    @triton.jit
    def _reciprocal(v, FAST: tl.constexpr):
        """1 / v. FAST (float32 on a GPU): one ``rcp.approx.ftz`` (relative error below 2⁻²², one
        special-function-unit op); Triton's ``/`` would add range checks costing 9 more instructions
        per term. Otherwise the exact division (float64, and the interpreter, which runs no PTX)."""
        if FAST:
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return 1.0 / v

    @triton.jit
    def _phi_and_derivative(dist, eps, gamma, delta, NORM: tl.constexpr, FAST: tl.constexpr):
        """(φ, φ') of functional.REWEIGHTS / REWEIGHT_DERIVATIVES[norm]; φ' = 0 where a clamp is active or tied."""
        if NORM == 0:  # L2
            wt = dist * 0.0 + 1.0
            dw = dist * 0.0
        elif NORM == 1:  # L1
            t = _reciprocal(dist + eps, FAST)
            wt = t
            dw = -t * t
        elif NORM == 2:  # MCP
            t = _reciprocal(dist + eps, FAST)
            v = t - 1.0 / gamma
            wt = tl.maximum(v, eps)
            dw = tl.where(v > eps, -t * t, 0.0)
        elif NORM == 3:  # Huber
            r = _reciprocal(dist + eps, FAST)
            t = delta * r
            wt = tl.minimum(t, 1.0)
            dw = tl.where(t < 1.0, -t * r, 0.0)  # = -t²/δ, without a division per term
        else:  # HM
            t = _reciprocal(dist + eps, FAST)
            c = delta / (gamma - delta)
            v = c * (gamma * t - 1.0)
            wt = tl.minimum(tl.maximum(v, eps), 1.0)
            dw = tl.where((v > eps) & (v < 1.0), -(c * gamma) * t * t, 0.0)
        return wt, dw

    @triton.jit
    def _tile(R, O, BR: tl.constexpr, BO: tl.constexpr):
        """This program's group, rows, outputs, their masks and the offsets of its (BR × BO) tile in (G, R, O)."""
        g = tl.program_id(2).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        outs = tl.program_id(1).to(tl.int64) * BO + tl.arange(0, BO)
        rmask = rows < R
        omask = outs < O
        zmask = rmask[:, None] & omask[None, :]
        return g, rows, outs, rmask, omask, zmask, g * R * O + rows[:, None] * O + outs[None, :]

    @triton.jit
    def _irls_fwd_kernel(x_ptr, w_ptr, z0_ptr, p_ptr, out_ptr, zs_ptr, s_ptr,
                         plane, R, O, D, K,
                         sxg, sxr, sxd, swg, swo, swd,
                         NORM: tl.constexpr, KEEP: tl.constexpr,
                         BR: tl.constexpr, BO: tl.constexpr, UNROLL: tl.constexpr, FAST: tl.constexpr):
        """K IRLS steps for one (BR × BO) tile of group program_id(2). z tensors: contiguous (G, R, O).

        Each thread keeps its (row, output) pairs' Σ w and Σ w u in registers and walks d = 0 … D−1:
        one x value per row and one weight per output are loaded, the terms never leave registers
        and no reduction crosses threads.
        """
        g, rows, outs, rmask, omask, zmask, zoff = _tile(R, O, BR, BO)
        eps, gamma, delta = tl.load(p_ptr), tl.load(p_ptr + 1), tl.load(p_ptr + 2)
        z = tl.load(z0_ptr + zoff, mask=zmask, other=0.0)
        xcol = x_ptr + g * sxg + rows * sxr
        wcol = w_ptr + g * swg + outs * swo
        for k in range(K):
            c = z / D
            num = tl.zeros((BR, BO), dtype=z.dtype)
            den = tl.zeros((BR, BO), dtype=z.dtype)
            for d in tl.range(0, D, loop_unroll_factor=UNROLL):
                u = tl.load(xcol + d * sxd, mask=rmask, other=0.0)[:, None] * \
                    tl.load(wcol + d * swd, mask=omask, other=0.0)[None, :]
                wt, _ = _phi_and_derivative(tl.abs(u - c), eps, gamma, delta, NORM, FAST)  # φ' unused: compiled away
                den += wt
                num += wt * u
            z = D * num / tl.maximum(den, _S_MIN)
            if KEEP:
                at = (k + g * 0) * plane + zoff  # int64 offsets: K × plane may pass 2³¹
                tl.store(zs_ptr + at, z, mask=zmask)
                tl.store(s_ptr + at, den, mask=zmask)
        tl.store(out_ptr + zoff, z, mask=zmask)

    @triton.jit
    def _irls_bwd_kernel(x_ptr, w_ptr, zs_ptr, s_ptr, g_ptr, p_ptr, gx_ptr, gw_ptr, gz0_ptr,
                         plane, R, O, D, K,
                         sxg, sxr, sxd, swg, swo, swd,
                         NORM: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                         BR: tl.constexpr, BO: tl.constexpr, UNROLL: tl.constexpr, FAST: tl.constexpr):
        """Analytic VJP of the K steps for one tile. zs: (K+1, G, R, O) = z_0..z_K, s: (K, G, R, O),
        g: (G, R, O) = dL/dz_K; adds into gx (G, R, D) and gw (G, O, D) (contiguous), writes gz0 (G, R, O).

        Walks d like the forward kernel; for each d the term gradient's two reductions
        (over the tile's outputs for g_x, over its rows for g_w) are added with atomic adds.
        """
        g, rows, outs, rmask, omask, zmask, zoff = _tile(R, O, BR, BO)
        eps, gamma, delta = tl.load(p_ptr), tl.load(p_ptr + 1), tl.load(p_ptr + 2)
        grad = tl.load(g_ptr + zoff, mask=zmask, other=0.0)
        xcol = x_ptr + g * sxg + rows * sxr
        wcol = w_ptr + g * swg + outs * swo
        gxcol = gx_ptr + g * R * D + rows * D
        gwcol = gw_ptr + g * O * D + outs * D
        for i in range(K):
            k = K - 1 - i + g * 0  # int64 offsets
            zk = tl.load(zs_ptr + k * plane + zoff, mask=zmask, other=0.0)
            zk1 = tl.load(zs_ptr + (k + 1) * plane + zoff, mask=zmask, other=0.0)
            S = tl.load(s_ptr + k * plane + zoff, mask=zmask, other=1.0)
            Sc = tl.maximum(S, _S_MIN)
            zn = tl.where(S > _S_MIN, zk1 / D, 0.0)  # clamp active: the z_{k+1} term drops
            c = zk / D
            gs = grad * D / Sc  # 0 on padding pairs (grad loaded as 0): they add nothing to g_x, g_w
            asum = tl.zeros((BR, BO), dtype=grad.dtype)
            for d in tl.range(0, D, loop_unroll_factor=UNROLL):
                xv = tl.load(xcol + d * sxd, mask=rmask, other=0.0)
                av = tl.load(wcol + d * swd, mask=omask, other=0.0)
                u = xv[:, None] * av[None, :]
                r = u - c
                wt, dw = _phi_and_derivative(tl.abs(r), eps, gamma, delta, NORM, FAST)
                a = tl.where(r > 0, dw, tl.where(r < 0, -dw, 0.0)) * (u - zn)
                asum += a
                gu = (wt + a) * gs
                if NEED_X:
                    tl.atomic_add(gxcol + d, tl.sum(gu * av[None, :], axis=1), mask=rmask)
                if NEED_W:
                    tl.atomic_add(gwcol + d, tl.sum(gu * xv[:, None], axis=0), mask=omask)
            grad = -(grad / Sc) * asum
        tl.store(gz0_ptr + zoff, grad, mask=zmask)

else:  # keep the names defined so interpreted() and the launchers fail cleanly
    _irls_fwd_kernel = _irls_bwd_kernel = None


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _np2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Largest (rows BR, outputs BO, d-loop unroll, warps) per program and dtype, chosen from the static
# sm_90 report of benchmarks/triton_aot.py (fewest SASS instructions per term with no spills;
# README "Fused GPU kernels"); not yet timed on a GPU. float32 L1: forward 164 registers and 7.0
# instructions per term, backward 168 registers and 21 (its two per-d reductions cross threads).
TILES = {
    torch.float32: {"forward": (32, 64, 4, 4), "backward": (64, 32, 1, 4)},
    torch.float64: {"forward": (32, 32, 2, 4), "backward": (32, 32, 1, 4)},  # larger ones spill
}
MIN_TILE = 16


def tile_sizes(R: int, O: int, dtype: torch.dtype, backward: bool, groups: int = 1,
               programs: int = 0) -> tuple[int, int, int, int]:
    """(BR, BO, UNROLL, num_warps): one program's tile of rows × outputs, its d-loop unroll and warps.

    Starts from :data:`TILES` and the problem's size (powers of two, at least 16), then halves the
    larger side while fewer than ``programs`` programs would run (2 per SM at launch), so a small
    layer still spreads over the whole GPU: the IRLS cannot split D, each step needs all of it.
    """
    if interpreted():  # every tile operation is a Python call there: few, large tiles
        return min(64, _np2(R)), min(64, _np2(O)), 1, 4
    br, bo, unroll, warps = TILES[dtype]["backward" if backward else "forward"]
    br, bo = max(MIN_TILE, min(br, _np2(R))), max(MIN_TILE, min(bo, _np2(O)))
    while groups * -(-R // br) * -(-O // bo) < programs and max(br, bo) > MIN_TILE:
        if br >= bo:
            br //= 2
        else:
            bo //= 2
    return br, bo, unroll, warps


_SM_COUNTS: dict[int, int] = {}


def _programs_wanted(x: torch.Tensor) -> int:
    """Two programs per SM of x's GPU (0 on CPU, in the interpreter)."""
    if x.device.type != "cuda":
        return 0
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNTS[index]


def _fast_reciprocal(x: torch.Tensor) -> bool:
    """Whether the kernels use the approximate float32 reciprocal (compiled float32 kernels)."""
    return x.dtype == torch.float32 and not interpreted()


def _params(settings, like: torch.Tensor) -> torch.Tensor:
    """ε, γ, δ as a tensor of the data's dtype (kernel scalars would be rounded to float32)."""
    return torch.tensor([settings.eps, settings.gamma, settings.delta], dtype=like.dtype, device=like.device)


def forward(x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor, settings, keep: bool):
    """K IRLS steps fused. x (G, R, D), w (G, O, D), z0 (G, R, O) -> z_K (G, R, O), [z_1..z_K], [S_0..S_{K-1}].

    The lists are empty unless ``keep`` (what backward needs; each entry (G, R, O)).
    """
    G, R, D = x.shape
    O, K = w.shape[1], settings.K
    z0 = z0.contiguous()
    out = torch.empty_like(z0)
    zs = torch.empty((K, G, R, O), dtype=z0.dtype, device=z0.device) if keep else out
    sums = torch.empty((K, G, R, O), dtype=z0.dtype, device=z0.device) if keep else out
    BR, BO, UNROLL, warps = tile_sizes(R, O, x.dtype, False, G, _programs_wanted(x))
    grid = (triton.cdiv(R, BR), triton.cdiv(O, BO), G)
    _irls_fwd_kernel[grid](x, w, z0, _params(settings, x), out, zs, sums, G * R * O, R, O, D, K,
                           *x.stride(), *w.stride(), NORM=NORM_CODES[settings.norm], KEEP=keep,
                           BR=BR, BO=BO, UNROLL=UNROLL, FAST=_fast_reciprocal(x), num_warps=warps)
    calls["forward"] += 1
    return out, (list(zs.unbind(0)) if keep else []), (list(sums.unbind(0)) if keep else [])


def backward(x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor, zs, sums, grad: torch.Tensor, settings,
             need_x: bool, need_w: bool):
    """Fused VJP of :func:`forward`. zs, sums: the K iterates/sums it kept; grad (G, R, O) = dL/dz_K.

    Returns (g_x (G, R, D) or None, g_w (G, O, D) or None, g_z0 (G, R, O)).
    """
    G, R, D = x.shape
    O, K = w.shape[1], settings.K
    zstack = torch.stack([z0, *zs]).contiguous()
    sstack = torch.stack(list(sums)).contiguous()
    grad = grad.contiguous()
    gx = torch.zeros((G, R, D), dtype=x.dtype, device=x.device) if need_x else grad
    gw = torch.zeros((G, O, D), dtype=w.dtype, device=w.device) if need_w else grad
    gz0 = torch.empty_like(grad)
    BR, BO, UNROLL, warps = tile_sizes(R, O, x.dtype, True, G, _programs_wanted(x))
    grid = (triton.cdiv(R, BR), triton.cdiv(O, BO), G)
    _irls_bwd_kernel[grid](x, w, zstack, sstack, grad, _params(settings, x), gx, gw, gz0, G * R * O, R, O, D, K,
                           *x.stride(), *w.stride(), NORM=NORM_CODES[settings.norm], NEED_X=need_x,
                           NEED_W=need_w, BR=BR, BO=BO, UNROLL=UNROLL, FAST=_fast_reciprocal(x), num_warps=warps)
    calls["backward"] += 1
    return (gx if need_x else None), (gw if need_w else None), gz0


def disable(err: Exception) -> None:
    """Warn that a kernel failed and switch the Triton path off for this process."""
    switch.fail("the Triton kernel", err)


def run(src, x, w, z0, settings, reweight, dreweight, rows: int, outs: int) -> torch.Tensor:
    """z_NRPM (G, R, O) of a row source, differentiable, through the ``robust_surgery::nrpm_irls``
    operator (:mod:`robust_surgery.nn.backends.ops`): the eager backend's block loop with the fused
    chunk functions, one launch per unfolded row block (all outputs at once); ``rows`` × ``outs``
    (the eager chunk size) serve if the backward kernel fails."""
    from robust_surgery.nn.backends import ops

    return ops.run(NAME, src, x, w, z0, settings, rows, outs)


def chunk_functions(settings, eager_backward: Callable, rows: int, outs: int):
    """(forward_chunk, backward_chunk) with the signatures of the eager backend's, fused.

    The fused ones take a whole row block at once. ``eager_backward`` (the eager backend's
    ``backward``) with chunks of ``rows`` × ``outs`` (the eager, budgeted sizes) takes over if the
    backward kernel fails, and the path is switched off for the process (the dispatcher reruns a
    failed forward eagerly itself).
    """

    def fwd(x, w, z0, K, reweight, d_first, keep):
        return forward(x, w, z0, settings, keep)

    def bwd(x, w, z0, zs, sums, g, K, reweight, dreweight, d_first, need_x, need_w):
        if enabled():
            try:
                return backward(x, w, z0, zs, sums, g, settings, need_x, need_w)
            except Exception as err:  # noqa: BLE001 - compile/launch failure: eager from now on
                disable(err)
        R, O = x.shape[1], w.shape[1]
        gx = torch.zeros_like(x) if need_x else None
        gw = torch.zeros_like(w) if need_w else None
        gz0 = torch.empty_like(z0)
        for r0 in range(0, R, rows):
            r = slice(r0, r0 + rows)
            for o0 in range(0, O, outs):
                o = slice(o0, o0 + outs)
                gxc, gwc, gzc = eager_backward(x[:, r], w[:, o], z0[:, r, o], [z[:, r, o] for z in zs],
                                               [s[:, r, o] for s in sums], g[:, r, o], K, reweight, dreweight,
                                               d_first, need_x, need_w)
                if need_x:
                    gx[:, r] += gxc
                if need_w:
                    gw[:, o] += gwc
                gz0[:, r, o] = gzc
        return gx, gw, gz0

    return fwd, bwd
