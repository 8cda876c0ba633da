"""Fused Triton kernels for the NRPM IRLS (forward and analytic backward), used for CUDA tensors.

The math is stated in :mod:`robust_surgery.nn.functional` (reweighting functions φ and their
derivatives φ', the IRLS step) and its vector-Jacobian product in :mod:`robust_surgery.nn.kernels`;
these kernels compute exactly that, without any term-sized tensor in memory:

* forward: one program per tile of (``BR`` rows × ``BO`` outputs) of one group runs the K IRLS
  steps; each step streams over D in blocks of ``BD``, forms the product terms
  ``u = x_d a_d`` of the tile in registers (a ``BR × BO × BD`` block), reweights them and
  accumulates ``Σ w`` and ``Σ w u`` per output. It writes z_K and, when backward will follow,
  the per-output iterates z_1..z_K and sums S_0..S_{K-1} (the eager path saves the same).
* backward: the same tiling walks k = K−1 … 0, recomputing each step's terms from x, the
  weights and the saved iterates, and adds the term gradient's two reductions
  ``g_x[r, d] = Σ_o g_u a`` and ``g_a[o, d] = Σ_r g_u x`` into the outputs with atomic adds
  (once per step and D block); the gradient with respect to z_0 is written directly.

Supported: the built-in norms ``L2``, ``L1``, ``MCP``, ``Huber`` and ``HM`` (only while their
registered functions are the built-in ones), any K ≥ 1, ε, γ, δ, float32 and float64 (the
scalars ε, γ, δ are passed as a tensor of the data's dtype, so float64 keeps full precision).
Everything else (other dtypes, custom norms, empty inputs) runs the eager chunked path.

Dispatch (from :func:`robust_surgery.nn.kernels.run`): CUDA tensors use the compiled kernels
when Triton imports; with ``TRITON_INTERPRET=1`` in the environment *before this module is
imported*, CPU tensors run the kernels in Triton's interpreter (slow; for verification, see
tests/test_nrpm_triton.py). ``ROBUST_SURGERY_NRPM_TRITON=0`` or :func:`use_triton` (False)
turns the path off; a kernel that fails to compile or launch warns once and falls back to
the eager path.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

try:  # Triton is optional: without it every tensor runs the eager path
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure (missing, broken toolchain) means "unavailable"
    triton = None
    tl = None

from .functional import NORM_CODES, builtin_norm_code
from .kernels import S_MIN, Switch  # S_MIN: the release's max(Σ w, 1e-12)
DTYPES = (torch.float32, torch.float64)

switch = Switch("ROBUST_SURGERY_NRPM_TRITON", default=True)
launches = {"forward": 0, "backward": 0}  # kernel launches in this process (tests check dispatch)


def use_triton(enabled: bool = True) -> None:
    """Use the fused Triton kernels where supported (True) or always the eager path (False)."""
    switch.set(enabled)


def triton_enabled() -> bool:
    """Whether the Triton path may be used (``use_triton`` or env ROBUST_SURGERY_NRPM_TRITON, default on)."""
    return switch()


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
    if triton is None or not triton_enabled():
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
    def _phi_and_derivative(dist, eps, gamma, delta, NORM: tl.constexpr):
        """(φ, φ') of functional.REWEIGHTS / REWEIGHT_DERIVATIVES[norm]; φ' = 0 where a clamp is active or tied."""
        if NORM == 0:  # L2
            wt = dist * 0.0 + 1.0
            dw = dist * 0.0
        elif NORM == 1:  # L1
            t = 1.0 / (dist + eps)
            wt = t
            dw = -t * t
        elif NORM == 2:  # MCP
            t = 1.0 / (dist + eps)
            v = t - 1.0 / gamma
            wt = tl.maximum(v, eps)
            dw = tl.where(v > eps, -t * t, 0.0)
        elif NORM == 3:  # Huber
            t = delta / (dist + eps)
            wt = tl.minimum(t, 1.0)
            dw = tl.where(t < 1.0, -t * t / delta, 0.0)
        else:  # HM
            t = 1.0 / (dist + eps)
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
    def _load_terms(xrow, wrow, d0, D, rmask, omask, sxd, swd, BD: tl.constexpr):
        """The D block d0:d0+BD: indices, masks, x (BR, BD), weights (BO, BD) and terms (BR, BO, BD)."""
        ds = d0 + tl.arange(0, BD)
        dmask = ds < D
        xmask = rmask[:, None] & dmask[None, :]
        amask = omask[:, None] & dmask[None, :]
        xt = tl.load(xrow + ds[None, :] * sxd, mask=xmask, other=0.0)
        at = tl.load(wrow + ds[None, :] * swd, mask=amask, other=0.0)
        return ds, dmask, xmask, amask, xt, at, xt[:, None, :] * at[None, :, :]

    @triton.jit
    def _irls_fwd_kernel(x_ptr, w_ptr, z0_ptr, p_ptr, out_ptr, zs_ptr, s_ptr,
                         plane, R, O, D, K,
                         sxg, sxr, sxd, swg, swo, swd,
                         NORM: tl.constexpr, KEEP: tl.constexpr,
                         BR: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr):
        """K IRLS steps for one (BR × BO) tile of group program_id(2). z tensors: contiguous (G, R, O)."""
        g, rows, outs, rmask, omask, zmask, zoff = _tile(R, O, BR, BO)
        eps, gamma, delta = tl.load(p_ptr), tl.load(p_ptr + 1), tl.load(p_ptr + 2)
        z = tl.load(z0_ptr + zoff, mask=zmask, other=0.0)
        xrow = x_ptr + g * sxg + rows[:, None] * sxr
        wrow = w_ptr + g * swg + outs[:, None] * swo
        for k in range(K):
            c = z / D
            num = tl.zeros((BR, BO), dtype=z.dtype)
            den = tl.zeros((BR, BO), dtype=z.dtype)
            for d0 in range(0, D, BD):
                _, dmask, _, _, _, _, u = _load_terms(xrow, wrow, d0, D, rmask, omask, sxd, swd, BD)
                wt, _ = _phi_and_derivative(tl.abs(u - c[:, :, None]), eps, gamma, delta, NORM)  # φ' unused: compiled away
                wt = tl.where(dmask[None, None, :], wt, 0.0)
                den += tl.sum(wt, axis=2)
                num += tl.sum(wt * u, axis=2)
            z = D * num / tl.maximum(den, _S_MIN)
            if KEEP:
                tl.store(zs_ptr + k * plane + zoff, z, mask=zmask)
                tl.store(s_ptr + k * plane + zoff, den, mask=zmask)
        tl.store(out_ptr + zoff, z, mask=zmask)

    @triton.jit
    def _irls_bwd_kernel(x_ptr, w_ptr, zs_ptr, s_ptr, g_ptr, p_ptr, gx_ptr, gw_ptr, gz0_ptr,
                         plane, R, O, D, K,
                         sxg, sxr, sxd, swg, swo, swd,
                         NORM: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                         BR: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr):
        """Analytic VJP of the K steps for one tile. zs: (K+1, G, R, O) = z_0..z_K, s: (K, G, R, O),
        g: (G, R, O) = dL/dz_K; adds into gx (G, R, D) and gw (G, O, D) (contiguous), writes gz0 (G, R, O)."""
        g, rows, outs, rmask, omask, zmask, zoff = _tile(R, O, BR, BO)
        eps, gamma, delta = tl.load(p_ptr), tl.load(p_ptr + 1), tl.load(p_ptr + 2)
        grad = tl.load(g_ptr + zoff, mask=zmask, other=0.0)
        xrow = x_ptr + g * sxg + rows[:, None] * sxr
        wrow = w_ptr + g * swg + outs[:, None] * swo
        gxrow = gx_ptr + g * R * D + rows[:, None] * D
        gwrow = gw_ptr + g * O * D + outs[:, None] * D
        for i in range(K):
            k = K - 1 - i + g * 0  # int64 offsets
            zk = tl.load(zs_ptr + k * plane + zoff, mask=zmask, other=0.0)
            zk1 = tl.load(zs_ptr + (k + 1) * plane + zoff, mask=zmask, other=0.0)
            S = tl.load(s_ptr + k * plane + zoff, mask=zmask, other=1.0)
            Sc = tl.maximum(S, _S_MIN)
            zn = tl.where(S > _S_MIN, zk1 / D, 0.0)  # clamp active: the z_{k+1} term drops
            c = zk / D
            gs = grad * D / Sc
            asum = tl.zeros((BR, BO), dtype=grad.dtype)
            for d0 in range(0, D, BD):
                ds, dmask, xmask, amask, xt, at, u = _load_terms(xrow, wrow, d0, D, rmask, omask, sxd, swd, BD)
                r = u - c[:, :, None]
                sgn = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
                wt, dw = _phi_and_derivative(tl.abs(r), eps, gamma, delta, NORM)
                a = dw * sgn * (u - zn[:, :, None])
                keep_d = dmask[None, None, :]
                a = tl.where(keep_d, a, 0.0)
                wt = tl.where(keep_d, wt, 0.0)
                asum += tl.sum(a, axis=2)
                gu = (wt + a) * gs[:, :, None]
                if NEED_X:
                    tl.atomic_add(gxrow + ds[None, :], tl.sum(gu * at[None, :, :], axis=1), mask=xmask)
                if NEED_W:
                    tl.atomic_add(gwrow + ds[None, :], tl.sum(gu * xt[:, None, :], axis=0), mask=amask)
            grad = -(grad / Sc) * asum
        tl.store(gz0_ptr + zoff, grad, mask=zmask)

else:  # keep the names defined so interpreted() and the launchers fail cleanly
    _irls_fwd_kernel = _irls_bwd_kernel = None


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _np2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tile_sizes(R: int, O: int, D: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, int, int]:
    """(BR, BO, BD, num_warps) for one program's tile of rows × outputs × D-block.

    GPU (not yet measured; the first thing to tune on a GPU): 32 rows × 32 outputs per D step with
    4 warps, 64 rows with 8 warps in backward (halving the weight-gradient atomics); BD = 4
    (2 for float64): about 32 live terms per thread and temporary. Interpreter: large tiles,
    since every tile operation costs a Python call there.
    """
    if interpreted():
        return min(64, _np2(R)), min(64, _np2(O)), min(32, _np2(D)), 4
    br, warps = (64, 8) if backward else (32, 4)
    bd = 2 if dtype == torch.float64 else 4
    return max(16, min(br, _np2(R))), max(16, min(32, _np2(O))), min(bd, _np2(D)), warps


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
    BR, BO, BD, warps = tile_sizes(R, O, D, x.dtype, backward=False)
    grid = (triton.cdiv(R, BR), triton.cdiv(O, BO), G)
    _irls_fwd_kernel[grid](x, w, z0, _params(settings, x), out, zs, sums, G * R * O, R, O, D, K,
                           *x.stride(), *w.stride(), NORM=NORM_CODES[settings.norm], KEEP=keep,
                           BR=BR, BO=BO, BD=BD, num_warps=warps)
    launches["forward"] += 1
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
    BR, BO, BD, warps = tile_sizes(R, O, D, x.dtype, backward=True)
    grid = (triton.cdiv(R, BR), triton.cdiv(O, BO), G)
    _irls_bwd_kernel[grid](x, w, zstack, sstack, grad, _params(settings, x), gx, gw, gz0, G * R * O, R, O, D, K,
                           *x.stride(), *w.stride(), NORM=NORM_CODES[settings.norm], NEED_X=need_x,
                           NEED_W=need_w, BR=BR, BO=BO, BD=BD, num_warps=warps)
    launches["backward"] += 1
    return (gx if need_x else None), (gw if need_w else None), gz0


def disable(err: Exception) -> None:
    """Warn that a kernel failed and switch the Triton path off for this process."""
    warnings.warn(f"NRPM: the Triton kernel failed ({type(err).__name__}: {err}); using the eager path",
                  RuntimeWarning)
    use_triton(False)


def chunk_functions(settings, eager_backward: Callable, rows: int, outs: int):
    """(forward_chunk, backward_chunk) with the signatures of the eager ones in kernels.py, fused.

    The fused ones take a whole row block at once. ``eager_backward`` (kernels.backward_chunk)
    with chunks of ``rows`` × ``outs`` (the eager, budgeted sizes) takes over if the backward
    kernel fails, and the path is switched off for the process (kernels.run reruns a failed
    forward eagerly itself).
    """

    def fwd(x, w, z0, K, reweight, d_first, keep):
        return forward(x, w, z0, settings, keep)

    def bwd(x, w, z0, zs, sums, g, K, reweight, dreweight, d_first, need_x, need_w):
        if triton_enabled():
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
