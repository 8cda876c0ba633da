"""The bounds on every setting that scales work, and the checks that apply them (one home).

Each is checked where a setting enters (the config objects and entry functions that the CLI,
Python calls and saved manifests all go through), so no option, argument or file can make a
command run without bound. The numbers are far above any real use and are stated in
``docs/safety.md``.
"""
from __future__ import annotations

import math

from robust_surgery.errors import InvalidInputError, NonFiniteError

__all__ = ["LIMITS", "check_count", "check_seed", "check_positive_finite"]

LIMITS = {
    "K": 100,  # IRLS steps of an NRPM layer (robust_surgery.nn.functional.MAX_K)
    "steps": 10_000,  # iterations of one attack (PGD, APGD, FAB, C&W) or PGD steps in training
    "restarts": 100,  # PGD restarts
    "queries": 1_000_000,  # Square's queries
    "epochs": 10_000,  # training epochs
    "batch_size": 1_000_000,
    "points": 1_000_000_000,  # --n, --n-train
    "zo_steps": 1_000_000,  # BAR's zeroth-order steps (a full-size program needs ~10^5)
    "directions": 10_000,  # BAR's random directions per gradient estimate (q)
}
MAX_SEED = 2 ** 63 - 1  # torch.manual_seed takes a signed 64-bit integer


def check_count(name: str, value, limit_key: str, *, minimum: int = 1, flag: str | None = None) -> int:
    """``value`` as a whole number in [minimum, LIMITS[limit_key]]; a clear error otherwise."""
    what = f"{name} ({flag})" if flag else name
    maximum = LIMITS[limit_key]
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidInputError(f"{what} must be a whole number >= {minimum} and at most {maximum:,}, got {value!r}"
                                + (" (a bound on the work one setting may ask for: docs/safety.md)"
                                   if isinstance(value, int) and value > maximum else ""))
    return value


def check_seed(seed, flag: str = "--seed") -> int:
    """A seed torch accepts: a whole number from 0 to 2**63 - 1."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"the seed ({flag}) must be a whole number from 0 to 2**63 - 1, got {seed!r}")
    return seed


def check_positive_finite(name: str, value, flag: str | None = None) -> float:
    """A finite number > 0 (a learning rate)."""
    what = f"{name} ({flag})" if flag else name
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NonFiniteError(f"{what} must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise InvalidInputError(f"{what} must be > 0, got {value!r}")
    return float(value)
