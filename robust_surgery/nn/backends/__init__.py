"""Execution paths of the NRPM IRLS behind one interface, and the dispatcher every NRPM layer calls.

Three backends, each a module with the interface described in :mod:`robust_surgery.nn.backends.base`
(``NAME``, ``switch``, ``calls``, ``available()``, ``enabled()``, ``supports()``, ``forward``,
``backward``, ``run``, ``disable``):

* ``eager`` — chunked torch code within a memory budget, any dtype, device and norm (the fallback);
* ``c`` — fused C kernels for CPU tensors (built on first use with the system compiler);
* ``triton`` — fused Triton kernels for CUDA tensors (CPU tensors too under ``TRITON_INTERPRET=1``).

The fused backends run through the ``torch.library`` custom operators of
:mod:`robust_surgery.nn.backends.ops`, so torch.compile and torch.export trace them as single nodes.

:func:`use_backend` is the one switch (environment variables do the same, see ``docs/kernels.md``);
:func:`run` picks the fused backend that supports the problem, else eager, and falls back to eager
for good (with one warning) when a fused kernel fails to build or launch.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Callable, Optional

import torch

from robust_surgery.errors import InvalidInputError
from robust_surgery.nn.backends import eager

NAMES = ("eager", "c", "triton")


def get_backend(name: str) -> ModuleType:
    """The backend module called ``name`` (one of :data:`NAMES`); imported on first use."""
    if name not in NAMES:
        raise InvalidInputError(f"unknown NRPM backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "c":  # plain import statements (not importlib): torch.compile traces them
        from robust_surgery.nn.backends import c as module
    elif name == "triton":
        from robust_surgery.nn.backends import triton as module
    else:
        module = eager
    return module


def use_backend(name: str, enabled: Optional[bool] = True) -> None:
    """Switch the fused backend ``name`` ("c" or "triton") on (True) or off (False) for this process;
    None hands the say back to its environment variable. The eager path cannot be switched off."""
    if name == "eager":
        if enabled is False:
            raise InvalidInputError("the eager NRPM backend is every other backend's fallback and cannot be "
                                    "switched off; switch off 'c' or 'triton' instead")
        return
    get_backend(name).switch.set(enabled)


def backend_status() -> dict:
    """{name: {"available": bool, "enabled": bool, "calls": {"forward": n, "backward": m}}} per backend."""
    out = {}
    for name in NAMES:
        b = get_backend(name)
        out[b.NAME] = {"available": b.available(), "enabled": b.enabled(), "calls": dict(b.calls)}
    return out


def select_backend(settings, x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor) -> ModuleType:
    """The backend that runs this problem: x (G, R, D), w (G, O, D), z0 (G, R, O).

    CPU tensors go to the C kernels, CUDA tensors to Triton (with TRITON_INTERPRET=1 set before
    import, CPU tensors go to Triton's interpreter instead: tests), when that backend supports
    the problem; everything else (meta tensors too) runs eager. The fused kernels are the custom
    operators of :mod:`robust_surgery.nn.backends.ops`, so torch.compile and torch.export trace
    them as single nodes; the eager chunks are plain torch ops they trace as well.
    """
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        fused = get_backend("c")
    elif x.device.type in ("cpu", "cuda"):
        fused = get_backend("triton")
    else:
        return eager
    return fused if _supports(fused, settings, x, w, z0) else eager


def _supports(fused: ModuleType, settings, x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor) -> bool:
    """``fused.supports(...)``; while torch.compile traces, asked outside the trace (the check reads
    switches and the file system, and may build the kernels) about the same dtypes and device."""
    if not torch.compiler.is_compiling():
        return fused.supports(settings, x, w, z0)
    return _supports_outside_trace(fused.NAME, settings.norm, settings.K, x.dtype, w.dtype, z0.dtype, x.device.type)


def _supports_outside_trace(name: str, norm: str, K: int, x_dtype, w_dtype, z_dtype, device: str) -> bool:
    from robust_surgery.nn.functional import NRPMSettings

    def probe(dtype):
        return torch.ones((1, 1, 1), dtype=dtype, device=device)

    return get_backend(name).supports(NRPMSettings(norm, K), probe(x_dtype), probe(w_dtype), probe(z_dtype))


# What torch.compiler.assume_constant_result(fn) does, without importing torch._dynamo at import
# time (1.3 s): dynamo calls the function while tracing and keeps its result as a constant
# (tests/nn/test_precision_and_tracing.py checks that torch still marks functions this way).
_supports_outside_trace._dynamo_marked_constant = True


def run(src, x, w, z0, settings, reweight: Callable, dreweight: Optional[Callable], rows: int, outs: int) -> torch.Tensor:
    """z_NRPM (G, R, O) from a row source (the eager backend's ``DenseRows``/``ConvRows``);
    differentiable in x, w and z0 when grad mode needs it. ``rows`` × ``outs`` is the eager chunk size."""
    backend = select_backend(settings, x, w, z0)
    if backend is eager:
        return eager.run(src, x, w, z0, settings, reweight, dreweight, rows, outs)
    try:
        return backend.run(src, x, w, z0, settings, reweight, dreweight, rows, outs)
    except Exception as err:  # noqa: BLE001 - a compile/launch failure: eager from now on
        backend.disable(err)
        return eager.run(src, x, w, z0, settings, reweight, dreweight, rows, outs)


__all__ = ["NAMES", "get_backend", "use_backend", "backend_status", "select_backend", "run"]
