"""The sanity report card: the checks that stop a defense from fooling its own evaluation.

Each check reads numbers the evaluation already measured (``docs/evaluation.md``, the sanity report
card). Over the ε sweep: the worst case falls as ε grows and reaches about 0 at a huge ε; input
gradients do not vanish; outputs are deterministic. At **every** ε, for the attacks that run after
the strong ones (stronger PGD, transfer from the λ = 1 network, BPDA, Square, FGSM): how many
points each broke that every attack before it left robust. A weak or indirect attack that finds
such points is the signature of gradient masking; each such point already counts in the worst case,
and the check makes it visible. Tolerances are in accuracy points (at least one point).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from robust_surgery.evaluation.budgets import format_eps
from robust_surgery.evaluation.kinds import Check, CheckJob

__all__ = ["CheckResult", "run_checks", "TOLERANCE", "STRONGER_TOLERANCE", "SQUARE_TOLERANCE", "HUGE_EPS_MAX"]

TOLERANCE = 1.0  # points an indirect or single-step attack may add (at least one point)
STRONGER_TOLERANCE = 2.0  # points twice the PGD steps with restarts may add
SQUARE_TOLERANCE = 5.0  # points Square may add to the gradient attacks
HUGE_EPS_MAX = 5.0  # robust accuracy (%) still allowed at an unbounded budget


@dataclass
class CheckResult:
    """One line of the report card, at one ε (``eps``; None for a line about the whole sweep).
    ``passed`` is None when the check could not be run."""

    name: Check
    passed: bool | None
    detail: str
    numbers: dict = field(default_factory=dict)
    eps: float | None = None


# (check, the row's label, its tolerance in points, what the row is called)
_MARGINAL = (
    (Check.STRONGER_PGD, ("pgd-stronger",), STRONGER_TOLERANCE, "stronger PGD"),
    (Check.TRANSFER_NOT_STRONGER, ("transfer",), TOLERANCE, "transfer PGD"),
    (Check.BPDA_NOT_STRONGER, ("bpda",), TOLERANCE, "BPDA PGD"),
    (Check.SQUARE_NOT_STRONGER, ("square", "autoattack:square"), SQUARE_TOLERANCE, "Square"),
    (Check.PGD_BEATS_FGSM, ("fgsm",), TOLERANCE, "FGSM"),
)


def _allowed(points: float, n: int) -> int:
    return max(1, math.floor(points * n / 100.0 + 1e-9))


def run_checks(report, *, grad_zero: int, nondeterministic_batches: int) -> list[CheckResult]:
    """Evaluate the report card of the main variant of ``report`` (an ``EvalReport``)."""
    v = report.variants[0]
    out: list[CheckResult] = []
    rows = [r for r in report.results if r["model"] == v]

    # 1. accuracy falls as ε grows, and is about 0 at a huge ε
    worst = report.worst(v)
    tol = max(TOLERANCE, 100.0 / report.n)
    curve = [worst[x] for x in sorted(worst)]
    rises = [(a, b) for a, b in zip(curve, curve[1:]) if b > a + tol]
    out.append(CheckResult(Check.FALLS_WITH_EPS, not rises,
                           "worst-case accuracy per ε: " + ", ".join(f"{format_eps(x)}→{worst[x]:.1f}" for x in sorted(worst)),
                           {"curve": {str(x): worst[x] for x in sorted(worst)}}))
    huge = next((r for r in rows if r["check"] == CheckJob.HUGE_EPS), None)
    if huge:
        out.append(CheckResult(Check.ZERO_AT_HUGE_EPS, huge["robust_acc"] <= HUGE_EPS_MAX,
                               f"PGD at ε={huge['eps']:g}: {huge['robust_acc']:.1f} % (must be ≤ {HUGE_EPS_MAX:g})",
                               {"eps": huge["eps"], "robust_acc": huge["robust_acc"]}))

    # 2. at every ε: the later attacks add (almost) nothing to the earlier, stronger ones
    for e in report.eps:
        if e == 0:
            continue
        at = {r["label"]: r for r in rows if r["eps"] == e and r["in_worst"]}
        for check, labels, points, what in _MARGINAL:
            r = next((at[label] for label in labels if label in at), None)
            if r is None or r["broken_new"] is None:
                continue
            allowed = _allowed(points, report.n)
            new = r["broken_new"]
            out.append(CheckResult(
                check, new <= allowed,
                f"{what}: {new} new point{'s' if new != 1 else ''} broken ({100.0 * new / report.n:.1f} %), "
                f"allowed {allowed}",
                {"broken_new": new, "allowed": allowed, "label": r["label"]}, eps=e))

    # 3. vanishing input gradients
    frac = 100.0 * grad_zero / report.n
    out.append(CheckResult(Check.GRADIENTS_DO_NOT_VANISH, frac <= 1.0,
                           f"{grad_zero} of {report.n} points have an all-zero input gradient ({frac:.1f} %)",
                           {"zero_gradient_points": grad_zero}))

    # 4. deterministic outputs (randomness would need EOT)
    out.append(CheckResult(Check.DETERMINISTIC, nondeterministic_batches == 0,
                           f"{nondeterministic_batches} batches gave different outputs on a second pass",
                           {"nondeterministic_batches": nondeterministic_batches}))
    return out
