"""Attack budgets ε: parsed from text (``"0,0.1,8/255"``), checked, and written back (``8/255``).

No torch here: the CLI parses ``--eps`` before anything heavy is imported.
"""
from __future__ import annotations

import math
from typing import Sequence

from robust_surgery.errors import InvalidInputError, InvalidTypeError, NonFiniteError

__all__ = ["check_budgets", "format_eps", "parse_eps"]


def parse_eps(text: str) -> tuple[float, ...]:
    """``"0,0.05,8/255"`` -> (0.0, 0.05, 0.0313...)."""
    out = []
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts[:-1]) or (len(parts) > 1 and not parts[-1]):
        raise InvalidInputError(f"--eps has an empty value between commas ({text!r}); give budgets such as 0,0.1,8/255")
    for part in parts:
        if not part:
            continue
        try:
            if "/" in part:
                a, b = part.split("/")
                out.append(float(a) / float(b))
            else:
                out.append(float(part))
        except (ValueError, ZeroDivisionError):
            raise InvalidInputError(f"--eps takes numbers or fractions separated by commas (0,0.1,8/255), got {part!r}") from None
    if not out:
        raise InvalidInputError("--eps is empty: give budgets such as 0,0.1,8/255")
    return tuple(check_budgets(out))


def check_budgets(eps: Sequence[float], what: str = "eps") -> list[float]:
    """``eps`` as floats, or a clear error for NaN, infinite or negative budgets."""
    out = []
    for e in eps:
        if isinstance(e, (str, bytes, bool)):
            raise InvalidTypeError(f"{what} takes numbers, got {e!r} (a {type(e).__name__}); write 0.1, not '0.1'")
        try:
            e = float(e)
        except (TypeError, ValueError):
            raise InvalidTypeError(f"{what} takes numbers, got {e!r}") from None
        if not math.isfinite(e):
            raise NonFiniteError(f"{what} must be finite budgets, got {e}")
        if e < 0:
            raise InvalidInputError(f"{what} must be >= 0 (a budget is a distance), got {e:g}")
        out.append(e)
    return out


def format_eps(eps: float) -> str:
    """``8/255`` style when ε is a whole number of 1/255 steps below 1, else ``%g``."""
    k = eps * 255
    if 0 < eps < 1 and abs(k - round(k)) < 1e-6 and round(k) not in (0, 255) and abs(eps * 20 - round(eps * 20)) > 1e-9:
        return f"{round(k)}/255"
    return f"{eps:g}"
