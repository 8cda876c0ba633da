"""The sanity report card: the checks that stop a defense from fooling its own evaluation.

Each check reads numbers the evaluation already measured (``docs/evaluation.md``, the sanity report card):
accuracy falls with ε and reaches about 0 at a huge ε; stronger PGD is not weaker; PGD is not
weaker than FGSM; the gradient-free Square attack does not beat the gradient attacks by much;
input gradients do not vanish; outputs are deterministic; transfer from the λ = 1 network and
the BPDA surrogate do not beat the direct attack. Tolerances are in accuracy points.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from robust_surgery.evaluation.attacks import gradient_attacks
from robust_surgery.evaluation.budgets import format_eps
from robust_surgery.evaluation.kinds import Check, CheckJob, Source

__all__ = ["CheckResult", "run_checks", "TOLERANCE", "SQUARE_TOLERANCE", "HUGE_EPS_MAX"]

TOLERANCE = 1.0  # points: slack for random starts on small n (at least one point)
SQUARE_TOLERANCE = 5.0  # points Square may beat the gradient attacks by
HUGE_EPS_MAX = 5.0  # robust accuracy (%) still allowed at an unbounded budget


@dataclass
class CheckResult:
    """One line of the report card. ``passed`` is None when the check could not be run."""

    name: Check
    passed: bool | None
    detail: str
    numbers: dict = field(default_factory=dict)


def _find(report, variant, **match):
    for r in report.results:
        if r["model"] == variant and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def run_checks(report, *, grad_zero: int, nondeterministic_batches: int) -> list[CheckResult]:
    """Evaluate the report card of the main variant of ``report`` (an ``EvalReport``)."""
    v = report.variants[0]
    e = max(report.eps)
    tol = max(TOLERANCE, 100.0 / report.n)
    out: list[CheckResult] = []
    direct_pgd = _find(report, v, attack="pgd", eps=e, source=Source.DIRECT, check=None) or \
        _find(report, v, attack="pgd", eps=e, source=Source.DIRECT, check=CheckJob.PGD_AT_MAX_EPS)
    fgsm = _find(report, v, attack="fgsm", eps=e, source=Source.DIRECT, check=None) or \
        _find(report, v, attack="fgsm", eps=e, source=Source.DIRECT, check=CheckJob.FGSM_AT_MAX_EPS)


    # 1. accuracy falls as ε grows, and is about 0 at a huge ε
    worst = report.worst(v)
    curve = [worst[x] for x in sorted(worst)]
    rises = [(a, b) for a, b in zip(curve, curve[1:]) if b > a + tol]
    out.append(CheckResult(Check.FALLS_WITH_EPS, not rises,
                           "worst-case accuracy per ε: " + ", ".join(f"{format_eps(x)}→{worst[x]:.1f}" for x in sorted(worst)),
                           {"curve": {str(x): worst[x] for x in sorted(worst)}}))
    huge = _find(report, v, check=CheckJob.HUGE_EPS)
    if huge:
        out.append(CheckResult(Check.ZERO_AT_HUGE_EPS, huge["robust_acc"] <= HUGE_EPS_MAX,
                               f"PGD at ε={huge['eps']:g}: {huge['robust_acc']:.1f} % (must be ≤ {HUGE_EPS_MAX:g})",
                               {"eps": huge["eps"], "robust_acc": huge["robust_acc"]}))

    # 2. more steps and restarts are not weaker
    strong = _find(report, v, check=CheckJob.PGD_STRONGER)
    if strong and direct_pgd:
        out.append(CheckResult(Check.STRONGER_PGD, strong["robust_acc"] <= direct_pgd["robust_acc"] + tol,
                               f"PGD-{strong['steps']}×{strong['restarts']} {strong['robust_acc']:.1f} % vs "
                               f"PGD-{direct_pgd['steps']} {direct_pgd['robust_acc']:.1f} %",
                               {"strong": strong["robust_acc"], "base": direct_pgd["robust_acc"]}))

    # 3. iterative is not weaker than single-step
    if fgsm and direct_pgd:
        out.append(CheckResult(Check.PGD_BEATS_FGSM, direct_pgd["robust_acc"] <= fgsm["robust_acc"] + tol,
                               f"PGD {direct_pgd['robust_acc']:.1f} % vs FGSM {fgsm['robust_acc']:.1f} %",
                               {"pgd": direct_pgd["robust_acc"], "fgsm": fgsm["robust_acc"]}))

    # 4. a gradient-free attack must not beat the gradient attacks by much
    square = _find(report, v, check=CheckJob.SQUARE) or _find(report, v, attack="square", eps=e, check=None)
    gradient = [r["robust_acc"] for r in report.results if r["model"] == v and r["eps"] == e
                and r["attack"] in gradient_attacks() and r["source"] == Source.DIRECT]
    if square and gradient:
        best = min(gradient)
        out.append(CheckResult(Check.SQUARE_NOT_STRONGER, square["robust_acc"] >= best - SQUARE_TOLERANCE,
                               f"Square {square['robust_acc']:.1f} % vs best gradient attack {best:.1f} %",
                               {"square": square["robust_acc"], "best_gradient": best}))

    # 5. vanishing input gradients
    frac = 100.0 * grad_zero / report.n
    out.append(CheckResult(Check.GRADIENTS_DO_NOT_VANISH, frac <= 1.0,
                           f"{grad_zero} of {report.n} points have an all-zero input gradient ({frac:.1f} %)",
                           {"zero_gradient_points": grad_zero}))

    # 6. deterministic outputs (randomness would need EOT)
    out.append(CheckResult(Check.DETERMINISTIC, nondeterministic_batches == 0,
                           f"{nondeterministic_batches} batches gave different outputs on a second pass",
                           {"nondeterministic_batches": nondeterministic_batches}))

    # 7. transfer from the original network and the BPDA surrogate
    for name, label in ((Source.TRANSFER, Check.TRANSFER_NOT_STRONGER), (Source.BPDA, Check.BPDA_NOT_STRONGER)):
        r = _find(report, v, check=CheckJob(name.value)) or _find(report, v, attack="pgd", eps=e, source=name, check=None)
        if r and direct_pgd:
            out.append(CheckResult(label, r["robust_acc"] >= direct_pgd["robust_acc"] - tol,
                                   f"{name} PGD {r['robust_acc']:.1f} % vs direct PGD {direct_pgd['robust_acc']:.1f} % "
                                   "(the reported robust accuracy is the worst of all)",
                                   {name: r["robust_acc"], "direct": direct_pgd["robust_acc"]}))
    return out
