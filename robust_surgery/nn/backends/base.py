"""What every NRPM backend shares: its on/off switch and its call counter.

A backend is a module of :mod:`robust_surgery.nn.backends` with the same small interface:

* ``NAME`` — its name for :func:`robust_surgery.nn.backends.use_backend` (``"eager"``, ``"c"``, ``"triton"``);
* ``switch`` — a :class:`Switch` (set from code, else an environment variable, else a default);
* ``calls`` — ``{"forward": n, "backward": m}``, kernel calls in this process (tests check dispatch);
* ``available()`` — the machine can run it (a C compiler, Triton importable);
* ``enabled()`` — available and switched on;
* ``supports(settings, x, w, z0)`` — enabled and able to run this problem (dtype, device, norm);
* ``forward(...)`` / ``backward(...)`` — one IRLS forward and its analytic backward;
* ``run(src, x, w, z0, settings, reweight, dreweight, rows, outs)`` — z (G, R, O) of a row source,
  differentiable; the dispatcher calls it;
* ``disable(err)`` — warn once and switch off for the process after a compile/launch failure.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional


class Switch:
    """An on/off setting of an NRPM execution path: set from code with :meth:`set`, else read from
    the environment variable ``env`` (``0``/``false``/``no``/``off`` mean off), else ``default``.
    ``set(None)`` hands the say back to the environment."""

    def __init__(self, env: str, default: bool):
        self.env, self.default, self.value = env, default, None

    def set(self, enabled: Optional[bool]) -> None:
        self.value = None if enabled is None else bool(enabled)

    def __call__(self) -> bool:
        if self.value is not None:
            return self.value
        raw = os.environ.get(self.env)
        if raw is None:
            return self.default
        return raw.strip().lower() not in ("0", "false", "no", "off", "")

    def fail(self, what: str, err: Exception) -> None:
        """Warn that ``what`` (a fused kernel) failed with ``err`` and switch this path off for the process."""
        warnings.warn(f"NRPM: {what} failed ({type(err).__name__}: {err}); using the eager path", RuntimeWarning)
        self.set(False)


def new_counter() -> dict:
    """A fresh ``calls`` counter: kernel calls per direction in this process."""
    return {"forward": 0, "backward": 0}
