"""Which attacks an evaluation runs, in which order, and on which points (the cascade).

An evaluation is a list of :class:`Job` s, one attack on one model variant at one ε. Jobs are
grouped into *units*; inside a unit each job attacks only the points that every earlier job of
the unit left robust (as AutoAttack runs its attacks), and a point's result after the unit's last
job is its worst case over the unit. By default (the cascade) all the jobs of one variant at one
ε form one unit, so a point already broken is never attacked again and a robust model costs far
less to evaluate. With ``per_attack`` every attack the user named (AutoAttack's four parts
together) is its own unit, run on every clean point, so each has its own column; the worst case
is then the per-point AND over the units. Either way the per-point worst case is the same
quantity; with random starts seeded per point (PGD, transfer, BPDA) it is the same number.

The order inside a unit is fixed, strongest attack first: AutoAttack's parts, APGD, PGD, C&W,
attacks of the user's own, stronger PGD, transfer from λ = 1, BPDA, Square, FGSM. The report card
reads, for each later attack, how many points it broke that every attack before it left robust.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from robust_surgery.evaluation.attacks import AttackConfig, autoattack_parts
from robust_surgery.evaluation.kinds import CheckJob, Source

__all__ = ["Job", "SOURCE_ATTACKS", "plan_jobs", "units"]

SOURCE_ATTACKS = (Source.TRANSFER, Source.BPDA)  # PGD with the gradients of the λ = 1 network / the straight-through surrogate
_RANK = {"autoattack": 0, "autoattack-10": 0.5, "apgd": 1, "pgd": 2, "cw": 3, "pgd-stronger": 5, "transfer": 6, "bpda": 7, "square": 8,
         "fgsm": 9}
_OTHER_RANK = 4  # attacks of the user's own (register_attack)


@dataclass(frozen=True)
class Job:
    """One attack on one model variant at one ε. ``source``: 'direct' (attack the variant itself),
    'transfer' (PGD with the λ = 1 network's gradients) or 'bpda' (the straight-through surrogate's).
    ``worst``: counts in the worst case. ``label``: the row's name (``pgd``, ``transfer``,
    ``autoattack:apgd-t``, ...), unique per variant and ε; ``group``: the attack name the user gave
    (``autoattack`` for its four parts); ``unit``: the cascade it runs in."""

    variant: str
    cfg: AttackConfig
    source: Source = Source.DIRECT
    worst: bool = True
    check: CheckJob | None = None
    label: str = ""
    group: str = ""
    unit: str = ""

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.source}:" + ("autoattack:" if self.group == "autoattack" else "") + self.cfg.key


def _entries(attacks: Sequence[str], checks: bool, converted_main: bool) -> list[tuple[str, str, CheckJob | None]]:
    """(label, group, check) of every attack at one ε, strongest first; the checks' extra attacks join
    where the list lacks them."""
    out = [(a, a, None) for a in attacks]
    if checks:
        have = set(attacks)
        if "pgd" not in have:
            out.append(("pgd", "pgd", CheckJob.PGD_REFERENCE))
        out.append(("pgd-stronger", "pgd-stronger", CheckJob.PGD_STRONGER))
        if converted_main:
            out += [(s.value, s.value, CheckJob(s.value)) for s in SOURCE_ATTACKS if s.value not in have]
        if "square" not in have and "autoattack" not in have:
            out.append(("square", "square", CheckJob.SQUARE))
        if "fgsm" not in have:
            out.append(("fgsm", "fgsm", CheckJob.FGSM))
    return sorted(out, key=lambda e: _RANK.get(e[0], _OTHER_RANK))  # stable: the user's own keep their order


def plan_jobs(attacks: Sequence[str], eps: Sequence[float], *, threat: str, variants: list[str], checks: bool,
              steps: int, alpha: float | None, restarts: int, queries: int, x_numel: int,
              per_attack: bool = False) -> list[Job]:
    """The jobs of an evaluation, in the order they run on a batch (see the module's docstring).

    ``checks`` adds the report card's attacks for ``variants[0]`` at every ε (in the worst case)
    and PGD at an unbounded budget once (not in it)."""

    def cfg(name, e, **kw):
        return AttackConfig(name, e, **{**dict(threat=threat, steps=steps, alpha=alpha, restarts=restarts,
                                               queries=queries), **kw})

    jobs: list[Job] = []
    main = variants[0]
    for v in variants:
        for e in eps:
            for label, group, check in _entries(attacks, checks and v == main, v == "nrpm"):
                if group in SOURCE_ATTACKS and v != "nrpm":
                    continue
                unit = f"{v}@{e:g}" + (f"/{group}" if per_attack else "")
                common = dict(check=check, group=group, unit=unit)
                if group == "autoattack":
                    jobs += [Job(v, part, label=f"autoattack:{part.name}", **common)
                             for part in autoattack_parts(e, threat)]
                elif group in SOURCE_ATTACKS:
                    jobs.append(Job(v, cfg("pgd", e), source=Source(group), label=label, **common))
                elif group == "pgd-stronger":
                    jobs.append(Job(v, cfg("pgd", e, steps=2 * steps, restarts=max(2, restarts)), label=label, **common))
                else:
                    jobs.append(Job(v, cfg(group, e), label=label, **common))
    if checks:
        huge = 1.0 if threat == "Linf" else math.sqrt(x_numel)
        jobs.append(Job(main, cfg("pgd", huge, alpha=2.5 * huge / steps), worst=False, check=CheckJob.HUGE_EPS,
                        label="huge-eps", group="huge-eps", unit="huge-eps"))
    return jobs


def units(jobs: list[Job]) -> list[list[Job]]:
    """The jobs grouped by unit, in order of first appearance (each unit keeps its jobs' order)."""
    out: dict[str, list[Job]] = {}
    for j in jobs:
        out.setdefault(j.unit, []).append(j)
    return list(out.values())
