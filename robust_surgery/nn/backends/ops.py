"""The fused NRPM kernels as ``torch.library`` custom operators, so torch.compile and torch.export see them.

Two operators, both in the ``robust_surgery`` namespace:

* ``torch.ops.robust_surgery.nrpm_irls(x, w, z0, backend, norm, K, eps, gamma, delta, geometry, rows,
  outs, keep) -> (z_K, zs, sums)`` — the K IRLS steps of every row (forward of the fused ``backend``,
  ``"c"`` or ``"triton"``);
* ``torch.ops.robust_surgery.nrpm_irls_backward(x, w, z0, zs, sums, grad, backend, ..., need_x, need_w)
  -> (g_x, g_w, g_z0)`` — its vector-Jacobian product, registered as the forward's autograd formula.

Shapes: w (G, O, D), z0 and z_K (G, R, O); ``zs``/``sums`` (K, G, R, O) are z_1..z_K and S_0..S_{K-1}
when ``keep`` (what backward needs), else empty. ``x`` is the rows (G, R, D) when ``geometry`` is
empty (Linear), else a convolution's padded input (B, C, *S) and ``geometry`` =
``[groups, items, n, *kernel, *stride, *dilation, *out_sizes]`` (n spatial dims; ``items``: batch
items unfolded at once by the block loop of the Triton path). ``rows``/``outs``: the eager chunk size,
used when a fused backward falls back to the eager path. A gradient that is not needed comes back
as an empty tensor (operators cannot return None).

Each operator has a fake (meta) implementation giving output shapes, so tracing never runs a
kernel; the real implementation is an opaque call that compiled graphs and exported programs keep
as one node. A kernel that fails at run time warns once, switches its backend off for the process
and computes the same numbers on the eager path (inside compiled code too).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from robust_surgery.nn.backends import eager

_NS = "robust_surgery"


# --------------------------------------------------------------------------------------------
# Arguments <-> the backends' objects
# --------------------------------------------------------------------------------------------
def conv_geometry_args(src) -> list[int]:
    """The ``geometry`` argument of the operators for an eager row source (empty for dense rows)."""
    if isinstance(src, eager.DenseRows):
        return []
    return [src.G, src.items, len(src.kernel), *src.kernel, *src.stride, *src.dilation, *src.L]


def _source(x: torch.Tensor, geometry: Sequence[int]):
    """The eager row source the ``geometry`` argument describes, over ``x``."""
    if not geometry:
        return eager.DenseRows(x)
    groups, items, n = geometry[:3]
    rest = list(geometry[3:])
    kernel, stride, dilation, out_sizes = (rest[i * n:(i + 1) * n] for i in range(4))
    return eager.ConvRows(x, kernel, stride, dilation, groups, out_sizes, items)


@functools.lru_cache(maxsize=64)  # every kernel call rebuilds them: validate each setting once
def _settings(norm: str, K: int, eps: float, gamma: float, delta: float):
    from robust_surgery.nn.functional import NRPMSettings

    return NRPMSettings(norm, K, eps=eps, gamma=gamma, delta=delta)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::nrpm_irls", mutates_args=())
def nrpm_irls(x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor, backend: str, norm: str, K: int, eps: float,
              gamma: float, delta: float, geometry: list[int], rows: int, outs: int,
              keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K fused IRLS steps; see the module docstring for the arguments and shapes."""
    from robust_surgery.nn.backends import get_backend

    settings = _settings(norm, K, eps, gamma, delta)
    src = _source(x, geometry)
    fused = get_backend(backend)
    if fused.switch() and x.numel() and w.numel():
        try:
            return _pack(z0, *_fused_forward(fused, src, x, w, z0, settings, keep))
        except Exception as err:  # noqa: BLE001 - a compile/launch failure: eager from now on
            fused.disable(err)
    with torch.no_grad():
        out, zs, sums = eager.irls_forward(src, x, w, z0, K, settings.reweight(), rows, outs, keep=keep,
                                           d_first=src.D < eager.D_FIRST_BELOW)
    return _pack(z0, out, zs, sums)


def _c_geometry(src):
    """The C kernels' offsets for a conv row source (None for dense rows)."""
    from robust_surgery.nn.backends.c import conv_geometry

    return None if isinstance(src, eager.DenseRows) else conv_geometry(src)


def _fused_forward(fused, src, x, w, z0, settings, keep: bool):
    if fused.NAME == "c":
        return fused.forward(x, w, z0, settings, keep=keep, geo=_c_geometry(src))
    fwd, _ = fused.chunk_functions(settings, eager.backward, src.block_rows, w.shape[1])
    return eager.irls_forward(src, x, w, z0, settings.K, None, src.block_rows, w.shape[1], keep=keep,
                              d_first=src.D < eager.D_FIRST_BELOW, fwd=fwd)


def _pack(z0: torch.Tensor, out, zs, sums):
    """The operator's three outputs; each missing one a distinct empty tensor (outputs may not alias)."""
    return out, (z0.new_empty(0) if zs is None else zs), (z0.new_empty(0) if sums is None else sums)


@nrpm_irls.register_fake
def _nrpm_irls_fake(x, w, z0, backend, norm, K, eps, gamma, delta, geometry, rows, outs, keep):
    kept = (K, *z0.shape) if keep else (0,)
    return torch.empty_like(z0), z0.new_empty(kept), z0.new_empty(kept)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::nrpm_irls_backward", mutates_args=())
def nrpm_irls_backward(x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor, zs: torch.Tensor, sums: torch.Tensor,
                       grad: torch.Tensor, backend: str, norm: str, K: int, eps: float, gamma: float, delta: float,
                       geometry: list[int], rows: int, outs: int, need_x: bool,
                       need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The VJP of :func:`nrpm_irls` (same arguments, its kept zs/sums, grad = dL/dz_K): (g_x, g_w, g_z0)."""
    from robust_surgery.nn.backends import get_backend

    settings = _settings(norm, K, eps, gamma, delta)
    src = _source(x, geometry)
    fused = get_backend(backend)
    grads = None
    if fused.switch() and x.numel() and w.numel():
        try:
            grads = _fused_backward(fused, src, x, w, z0, zs, sums, grad, settings, need_x, need_w, rows, outs)
        except Exception as err:  # noqa: BLE001 - a compile/launch failure: eager from now on
            fused.disable(err)
    if grads is None:
        grads = eager.irls_backward(src, x, w, z0, zs, sums, grad, K, settings.reweight(),
                                    settings.reweight_derivative(), rows, outs, src.D < eager.D_FIRST_BELOW,
                                    need_x, need_w, True)
    gx, gw, gz0 = grads
    return (grad.new_empty(0) if gx is None else gx), (grad.new_empty(0) if gw is None else gw), gz0


def _fused_backward(fused, src, x, w, z0, zs, sums, grad, settings, need_x, need_w, rows, outs):
    if fused.NAME == "c":
        return fused.backward(x, w, z0, zs, sums, grad, settings, need_x, need_w, geo=_c_geometry(src))
    # Triton: one launch per unfolded row block; the eager chunks of rows × outs if its kernel fails
    _, bwd = fused.chunk_functions(settings, eager.backward, rows, outs)
    return eager.irls_backward(src, x, w, z0, zs, sums, grad, settings.K, settings.reweight(),
                               settings.reweight_derivative(), src.block_rows, w.shape[1],
                               src.D < eager.D_FIRST_BELOW, need_x, need_w, True, bwd=bwd)


@nrpm_irls_backward.register_fake
def _nrpm_irls_backward_fake(x, w, z0, zs, sums, grad, backend, norm, K, eps, gamma, delta, geometry, rows, outs,
                             need_x, need_w):
    gx = torch.empty_like(x) if need_x else grad.new_empty(0)
    gw = torch.empty_like(w) if need_w else grad.new_empty(0)
    return gx, gw, torch.empty_like(z0)


# --------------------------------------------------------------------------------------------
# Autograd: the forward's formula is the backward operator
# --------------------------------------------------------------------------------------------
_OPTIONS = slice(3, 12)  # backend .. outs: the arguments both operators share after the tensors


def _setup_context(ctx, inputs, output):
    x, w, z0 = inputs[:3]
    _, zs, sums = output
    ctx.save_for_backward(x, w, z0, zs, sums)
    ctx.options = inputs[_OPTIONS]
    ctx.mark_non_differentiable(zs, sums)


def _backward(ctx, grad, _grad_zs, _grad_sums):
    x, w, z0, zs, sums = ctx.saved_tensors
    need_x, need_w, need_z0 = ctx.needs_input_grad[:3]
    if grad is None:
        return (None,) * 13
    gx, gw, gz0 = torch.ops.robust_surgery.nrpm_irls_backward(x, w, z0, zs, sums, grad, *ctx.options, need_x, need_w)
    return (gx if need_x else None, gw if need_w else None, gz0 if need_z0 else None, *(None,) * 10)


nrpm_irls.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# The one call the fused backends make
# --------------------------------------------------------------------------------------------
def run(backend: str, src, x, w, z0, settings, rows: int, outs: int) -> torch.Tensor:
    """z_NRPM (G, R, O) of an eager row source through the fused ``backend``'s operator; differentiable
    in x, w and z0 (the iterates are kept only when a gradient will be asked for)."""
    keep = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or z0.requires_grad)
    out, _, _ = torch.ops.robust_surgery.nrpm_irls(
        x, w, z0, backend, settings.norm, settings.K, float(settings.eps), float(settings.gamma),
        float(settings.delta), conv_geometry_args(src), int(rows), int(outs), keep)
    return out


__all__ = ["nrpm_irls", "nrpm_irls_backward", "run", "conv_geometry_args"]
