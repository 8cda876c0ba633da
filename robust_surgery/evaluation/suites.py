"""Named attack suites (``--suite``, Python ``suite=``): documented lists of attacks and budgets.

RobustBench and AutoAttack fix the attacks behind a number so that numbers can be compared; a
suite does the same here. Each is recorded in the JSON report and the state file.

- ``standard`` (the default): AutoAttack's standard version at its real strength (APGD-CE and
  APGD-T with 100 iterations, APGD-T and FAB-T over 9 target classes, Square with 5000 queries).
  On a converted model the sanity checks join at every ε and count in the worst case: PGD (the
  reference), PGD with twice the steps and at least 2 restarts, PGD transferred from the λ = 1
  network, BPDA (the straight-through surrogate), Square and FGSM. This is the adaptive worst case.
- ``quick``: FGSM and PGD-20, no checks; for smoke tests. Its output says that the worst case is
  not adaptive.
- ``paper``: PGD-20 with random start (step 2.5·ε/20) at each ε, no checks: the NRPM paper's own
  protocol, for side-by-side tables with its numbers only. Not a worst case.
"""
from __future__ import annotations

from dataclasses import dataclass

from robust_surgery.errors import InvalidInputError
from robust_surgery.evaluation.kinds import _StrEnum

__all__ = ["Suite", "SuiteSpec", "SUITES", "resolve_suite"]


class Suite(_StrEnum):
    """The named suites; ``custom`` is what an explicit attack list is recorded as."""

    STANDARD = "standard"
    QUICK = "quick"
    PAPER = "paper"
    CUSTOM = "custom"


@dataclass(frozen=True)
class SuiteSpec:
    """What a suite runs: ``attacks`` (names), PGD ``steps``, and whether the report card's checks run
    (``None``: on for converted models). ``adaptive``: its worst case includes the adaptive attacks
    on converted models. ``note``: one line shown with the results."""

    attacks: tuple[str, ...]
    steps: int
    checks: bool | None
    adaptive: bool
    note: str


SUITES: dict[Suite, SuiteSpec] = {
    Suite.STANDARD: SuiteSpec(("autoattack",), 20, None, True,
                              "standard suite: AutoAttack (APGD-CE, APGD-T, FAB-T: 100 iterations, 9 targets; Square: "
                              "5000 queries); on converted models also PGD, stronger PGD, transfer from λ = 1, BPDA, "
                              "Square and FGSM at every ε"),
    Suite.QUICK: SuiteSpec(("fgsm", "pgd"), 20, False, False,
                           "quick suite (FGSM + PGD-20): a smoke test; the worst case is NOT adaptive"),
    Suite.PAPER: SuiteSpec(("pgd",), 20, False, False,
                           "paper suite (PGD-20, random start): the NRPM paper's protocol for side-by-side tables; "
                           "NOT a worst case"),
}


def resolve_suite(suite) -> Suite:
    """``suite`` as a :class:`Suite` (a member or its name); a clear error for anything else."""
    try:
        return Suite(str(suite).strip().lower())
    except ValueError:
        names = ", ".join(s.value for s in SUITES)
        raise InvalidInputError(f"unknown suite {suite!r} (--suite): choose from {names}, or give --attack for "
                                "a list of your own") from None
