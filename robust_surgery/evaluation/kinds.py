"""The fixed vocabularies of an evaluation, as enums (in the manner of RobustBench's ``ThreatModel``).

Each member *is* its string (a ``str`` subclass), so rows, JSON, state files and comparisons
with plain strings keep working; code names the member instead of retyping the string.
"""
from __future__ import annotations

from enum import Enum

__all__ = ["Source", "CheckJob", "Check"]


class _StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Source(_StrEnum):
    """Whose gradients an attack follows (the ``source`` field of a result row)."""

    DIRECT = "direct"  # the evaluated model's own
    TRANSFER = "transfer"  # the λ = 1 (original) network's: PGD transferred to the converted model
    BPDA = "bpda"  # the straight-through surrogate's (BPDA)


class CheckJob(_StrEnum):
    """The extra attack runs the sanity report card asks for (the ``check`` field of a result row;
    None for the attacks the user asked for)."""

    PGD_STRONGER = "pgd-stronger"  # PGD with twice the steps and at least two restarts
    SQUARE = "square"  # the gradient-free Square attack
    HUGE_EPS = "huge-eps"  # PGD at an unbounded budget
    PGD_AT_MAX_EPS = "pgd-at-max-eps"  # PGD at the largest ε when the user did not run it
    FGSM_AT_MAX_EPS = "fgsm-at-max-eps"  # FGSM likewise
    TRANSFER = "transfer"  # transfer from the λ = 1 network
    BPDA = "bpda"  # the BPDA surrogate


class Check(_StrEnum):
    """The lines of the sanity report card (``CheckResult.name``); ``docs/evaluation.md``."""

    FALLS_WITH_EPS = "accuracy falls as ε grows"
    ZERO_AT_HUGE_EPS = "about 0 at a huge ε"
    STRONGER_PGD = "stronger PGD is not weaker"
    PGD_BEATS_FGSM = "PGD is not weaker than FGSM"
    SQUARE_NOT_STRONGER = "Square does not beat gradient attacks"
    GRADIENTS_DO_NOT_VANISH = "input gradients do not vanish"
    DETERMINISTIC = "outputs are deterministic"
    TRANSFER_NOT_STRONGER = "transfer from λ = 1 is not stronger"
    BPDA_NOT_STRONGER = "BPDA is not stronger"
