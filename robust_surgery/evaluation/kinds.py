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
    """The extra attack runs the sanity report card adds at every ε (the ``check`` field of a result
    row; None for the attacks the user or the suite asked for). All but HUGE_EPS count in the worst case."""

    PGD_REFERENCE = "pgd-reference"  # PGD when neither the user nor the suite ran it
    PGD_STRONGER = "pgd-stronger"  # PGD with twice the steps and at least two restarts
    TRANSFER = "transfer"  # PGD transferred from the λ = 1 network
    BPDA = "bpda"  # PGD through the straight-through surrogate (BPDA)
    SQUARE = "square"  # the gradient-free Square attack, when no Square ran
    FGSM = "fgsm"  # FGSM, when the user did not run it
    HUGE_EPS = "huge-eps"  # PGD at an unbounded budget (once; not in the worst case)


class Check(_StrEnum):
    """The lines of the sanity report card (``CheckResult.name``); ``docs/evaluation.md``.

    The per-ε lines count the points an attack broke that every attack before it (in the suite's
    order, strongest first) left robust: a masked defense shows up as a weak attack finding points
    the strong ones missed."""

    FALLS_WITH_EPS = "accuracy falls as ε grows"
    ZERO_AT_HUGE_EPS = "about 0 at a huge ε"
    STRONGER_PGD = "stronger PGD adds little"
    PGD_BEATS_FGSM = "FGSM adds nothing to the iterative attacks"
    SQUARE_NOT_STRONGER = "Square adds little to the gradient attacks"
    GRADIENTS_DO_NOT_VANISH = "input gradients do not vanish"
    DETERMINISTIC = "outputs are deterministic"
    TRANSFER_NOT_STRONGER = "transfer from λ = 1 adds nothing"
    BPDA_NOT_STRONGER = "BPDA adds nothing"
