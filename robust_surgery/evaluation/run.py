"""Robustness evaluation: attacks over an ε sweep, the sanity report card, sharding, resuming.

Robust accuracy (``docs/evaluation.md``) is the fraction of points classified
correctly on the clean input **and** after every attack run at that ε; the headline number
is the worst over all attacks, per point. What runs is a suite (:mod:`.suites`) or a list of
attacks, planned by :mod:`.plan`: by default the attacks at one ε cascade (each attacks only the
points every earlier one left robust). Points are processed in fixed global batches: batch ``b``
is attacked with seed ``seed + b`` (PGD's random starts are seeded per point) whatever process
runs it, so sharded runs (``torchrun``) and resumed runs give exactly the numbers of one
uninterrupted process.
"""
from __future__ import annotations

import contextlib
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.evaluation.attacks import (AttackTarget, PointSeededPGD, attack_names, build_attack, count_classes,
                                               check_labels_fit, check_unit_range, point_seed, within_budget)
from robust_surgery.data.resolve import resolve_data
from robust_surgery.errors import InvalidInputError, InvalidTypeError, NonFiniteError, StateMismatchError
from robust_surgery.evaluation.budgets import check_budgets, format_eps, parse_eps
from robust_surgery.evaluation.checks import CheckResult, run_checks
from robust_surgery.evaluation.kinds import Source
from robust_surgery.evaluation.plan import SOURCE_ATTACKS, Job, plan_jobs, units
from robust_surgery.evaluation.progress import EvalProgress
from robust_surgery.evaluation.suites import SUITES, Suite, resolve_suite
from robust_surgery._files import atomic_path, check_output_path
from robust_surgery._device import amp_name, resolve_amp
from robust_surgery._dist import all_reduce_sum_, dist_info
from robust_surgery._meta import get_meta
from robust_surgery.nn.layers import linear_mode, straight_through_mode
from robust_surgery.surgery.convert import is_converted
from robust_surgery.io.runrecord import RECORD_VERSION, nrpm_settings, pack_record, resume_file, state_digest, tensor_digest

__all__ = ["Job", "EvalReport", "evaluate", "default_eps", "format_eps", "parse_eps"]

_DEFAULT_EPS = {("mnist", "Linf"): (0.3,), ("mnist", "L2"): (2.0,), ("cifar10", "Linf"): (8 / 255,),
                ("cifar10", "L2"): (0.5,)}


def default_eps(dataset: str, threat: str) -> tuple[float, ...]:
    """The budget people compare against: MNIST L∞ 0.3 (L2 2.0), CIFAR-10 L∞ 8/255 (L2 0.5)."""
    try:
        return _DEFAULT_EPS[(dataset, threat)]
    except KeyError:
        raise InvalidInputError(f"no default ε for dataset {dataset!r} under {threat}; give eps=... (--eps)") from None


@dataclass
class EvalReport:
    """What an evaluation measured. Accuracies in percent over ``n`` points; ``to_dict()`` uses
    RobustBench's field names where they apply (clean_acc, autoattack_acc, eps, dataset,
    threat_model, architecture). ``suite``: the suite's name, or ``custom`` for an attack list;
    ``cascade``: each row's accuracy is after that attack and every row above it (the default),
    else each attack's own; ``adaptive``: on a converted model, transfer from λ = 1 and BPDA ran at
    every ε; ``note``: what the worst case is (shown with the results)."""

    dataset: str
    architecture: str
    threat_model: str
    n: int
    seed: int
    eps: list[float]
    clean: dict[str, int]
    results: list[dict]
    checks: list[CheckResult] = field(default_factory=list)
    complete: bool = True
    seconds: float = 0.0
    batches_done: int = 0
    batches_total: int = 0
    suite: str = Suite.CUSTOM.value
    cascade: bool = True
    adaptive: bool = True
    note: str = ""

    def worst(self, variant: str) -> dict[float, float]:
        """Worst-case robust accuracy (percent) per ε for ``variant``."""
        out = {}
        for e in self.eps:
            rows = [r for r in self.results if r["model"] == variant and r["eps"] == e and r["in_worst"]]
            if rows:
                out[e] = min(r["worst_robust_acc"] for r in rows)
        return out

    @property
    def variants(self) -> list[str]:
        return list(self.clean)

    def robust_acc(self, variant: str, attack: str, eps: float) -> float:
        """Robust accuracy (percent) after one attack at one ε: a row's label (``fgsm``, ``pgd``,
        ``transfer``, ``bpda``, ``pgd-stronger``, ``autoattack:apgd-t``, ...) or ``autoattack`` (after
        its four parts). With the cascade (the default) that is after this attack *and every row
        above it*; evaluate with ``per_attack=True`` for each attack's own number."""
        label = "autoattack:square" if attack == "autoattack" else attack
        for r in self.results:
            if r["model"] == variant and r["label"] == label and r["eps"] == eps:
                return r["robust_acc"]
        raise KeyError(f"no result for {variant}/{attack}@{eps}")

    def to_dict(self) -> dict:
        main = self.variants[0]
        worst = self.worst(main)
        head = max(self.eps)
        try:
            aa = self.robust_acc(main, "autoattack", head)
        except KeyError:
            aa = None
        d = {
            "dataset": self.dataset,
            "architecture": self.architecture,
            "threat_model": self.threat_model,
            "eps": format_eps(head),
            "n_examples": self.n,
            "seed": self.seed,
            "suite": self.suite,
            "cascade": self.cascade,
            "adaptive": self.adaptive,
            "note": self.note,
            "clean_acc": 100.0 * self.clean[main] / self.n,
            "robust_acc": worst.get(head),
            "autoattack_acc": aa,
            "complete": self.complete,
            "seconds": round(self.seconds, 2),
            "models": {
                v: {"clean_acc": 100.0 * c / self.n, "clean_correct": c,
                    "worst_robust_acc": {format_eps(e): a for e, a in self.worst(v).items()}}
                for v, c in self.clean.items()
            },
            "results": self.results,
            "checks": [asdict(c) for c in self.checks],
        }
        return d

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        how = ("cascade: each row is the accuracy after that attack and every row above it, run on the points "
               "still robust" if self.cascade else "each row is that attack alone")
        t = Table(caption=f"columns: ε; {how}; worst = per point, over every attack run at that ε"
                          + (f"\n{self.note}" if self.note else ""),
                  title=f"Robust accuracy (%) on {self.dataset}, {self.threat_model}, n = {self.n}, seed {self.seed}, "
                        f"suite {self.suite}"
                        + ("" if self.complete else f"  [partial: {self.batches_done}/{self.batches_total} batches]"))
        t.add_column("model")
        t.add_column("attack")
        t.add_column("clean", justify="right")
        for e in self.eps:
            t.add_column(format_eps(e), justify="right", no_wrap=True)
        for v in self.variants:
            clean = f"{100.0 * self.clean[v] / self.n:.1f}"
            seen = []
            for r in self.results:
                if r["model"] == v and r["in_worst"] and r["label"] not in seen:
                    seen.append(r["label"])
            for a in seen:
                cells = []
                for e in self.eps:
                    try:
                        cells.append(f"{self.robust_acc(v, a, e):.1f}")
                    except KeyError:
                        cells.append("")
                t.add_row(v, ("+ " if self.cascade and a != seen[0] else "") + a, clean, *cells)
            worst = self.worst(v)
            t.add_row(v, "[bold]worst[/bold]", clean,
                      *[f"[bold]{worst[e]:.1f}[/bold]" if e in worst else "" for e in self.eps])
        parts = [t]
        if self.checks:
            c = Table(title="Sanity report card", caption="new points broken: points an attack broke that every "
                                                                  "attack above it left robust (all count in the worst)")
            for col in ("check", "ε", "result", "numbers"):
                c.add_column(col)
            for ch in self.checks:
                mark = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "[yellow]n/a[/yellow]"}[ch.passed]
                c.add_row(ch.name, "" if ch.eps is None else format_eps(ch.eps), mark, ch.detail)
            parts.append(c)
        return Group(*parts)


# --------------------------------------------------------------------------------------------
# Data and model preparation
# --------------------------------------------------------------------------------------------
def _variant_context(variant: str):
    return linear_mode if variant == "original" else (lambda m: contextlib.nullcontext(m))


def _record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, jobs: list[Job], *, threat: str, batch_size: int,
            seed: int, mean, std, amp=None, suite: str = Suite.CUSTOM.value) -> dict:
    """Everything that changes an evaluation's numbers (see :mod:`robust_surgery.io.runrecord`)."""
    extra = {} if amp_name(amp) is None else {"amp": amp_name(amp)}
    return {**extra, "suite": suite,
        "version": RECORD_VERSION, "threat model": threat, "points": len(x), "batch size": batch_size, "seed": seed,
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
        "model weights": state_digest(model), "NRPM settings": nrpm_settings(model), "data": tensor_digest(x, y),
        "attacks": [{**asdict(j.cfg), "variant": j.variant, "source": j.source, "check": j.check, "in worst": j.worst,
                     "key": j.key, "label": j.label, "unit": j.unit} for j in jobs],
    }


def _check_inputs(x: torch.Tensor, y: torch.Tensor, batch_size, steps, restarts, queries, alpha, mean, std) -> None:
    from robust_surgery.limits import check_count

    check_count("batch_size", batch_size, "batch_size", flag="--batch-size")
    check_count("steps", steps, "steps", flag="--steps")
    check_count("restarts", restarts, "restarts", flag="--restarts")
    check_count("queries", queries, "queries", flag="--queries")
    if alpha is not None and not (math.isfinite(float(alpha)) and alpha > 0):
        raise InvalidInputError(f"alpha (--alpha, the PGD step) must be a finite number > 0, got {alpha!r}")
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise InvalidInputError(f"data must be images (N, C, H, W) with labels (N,); got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.is_floating_point() or (len(y) and int(y.min()) < 0):
        raise InvalidInputError("labels must be class indices 0, 1, 2, ... (integers)")
    if (mean is None) != (std is None):
        raise InvalidInputError("give both --mean and --std (per channel), or neither")
    if mean is not None:
        channels = x.shape[1]
        for name, values in (("--mean", mean), ("--std", std)):
            if len(values) != channels:
                raise InvalidInputError(f"{name} has {len(values)} values but the images have {channels} channel(s); "
                                 f"give one per channel")
            if not all(math.isfinite(float(v)) for v in values):
                raise NonFiniteError(f"{name} values must be finite, got {list(values)}")
        if any(float(v) <= 0 for v in std):
            raise InvalidInputError(f"--std values must be > 0 (they divide the pixels), got {list(std)}")


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def _attack_batch(job: Job, target: AttackTarget, model: nn.Module, xb, yb, n_classes: int, seed: int,
                  run_seed: int, points: torch.Tensor) -> torch.Tensor:
    """Adversarial examples of the points ``xb`` (B, C, H, W) for one job (x itself when ε = 0).
    ``seed``: the batch's seed; ``points``: the B points' indices in the data, which seed PGD's
    random starts point by point (with ``run_seed`` and the job), whatever else is in the batch."""
    if job.cfg.eps == 0:
        return xb
    torch.manual_seed(seed)
    if job.source == Source.TRANSFER:
        ctx = linear_mode(model)
    elif job.source == Source.BPDA:
        ctx = straight_through_mode(model)
    else:
        ctx = _variant_context(job.variant)(model)
    with ctx:
        attack = build_attack(job.cfg, target, n_classes, seed)
        if isinstance(attack, PointSeededPGD):
            salt = zlib.crc32(job.key.encode())
            attack.point_seeds = torch.tensor([point_seed(run_seed + salt, int(i)) for i in points])
        x_adv = attack(xb, yb)
    return x_adv.detach()


def evaluate(
    model: nn.Module,
    data,
    *,
    suite: str | Suite | None = None,
    attacks: Sequence[str] | None = None,
    eps: Sequence[float] | None = None,
    threat: str = "Linf",
    n: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    steps: int = 20,
    alpha: float | None = None,
    restarts: int = 1,
    queries: int = 1000,
    compare_original: bool = False,
    checks: bool | None = None,
    per_attack: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    data_root=None,
    state: str | Path | None = None,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    architecture: str | None = None,
    amp: str | None = None,
) -> EvalReport:
    """Evaluate ``model`` under a suite or a list of attacks at every ε of ``eps`` on ``data``.

    data: ``"mnist"``, ``"cifar10"``, a path (ImageFolder or .pt), a TensorDataset or an
    ``(images (N, C, H, W) in [0, 1], labels (N,))`` pair; ``n`` takes the first n points.
    suite: ``standard`` (the default), ``quick`` or ``paper`` (:mod:`robust_surgery.evaluation.suites`);
    or ``attacks``, a list of your own: ``fgsm``, ``pgd`` (random start seeded per point, ``steps``,
    step ``alpha`` = 2.5·ε/steps by default, ``restarts``), ``cw`` (L2; success only within ε),
    ``autoattack`` (the standard version at its real strength: APGD-CE, APGD-T, FAB-T, Square 5000),
    ``apgd-ce``, ``apgd-t``, ``fab-t``, ``apgd`` (APGD-CE then APGD-DLR), ``square`` (``queries``),
    and on converted models ``transfer``/``bpda``. ``threat``: ``Linf`` or ``L2``.
    ``checks`` (default: on for converted models in the standard suite and attack lists) adds the
    sanity report card's attacks at every ε, all counted in the worst case. ``per_attack``: run
    every attack on every clean point for its own column (default: the cascade, each attack on the
    points still robust; the same worst case, far cheaper). ``compare_original`` also evaluates
    the λ = 1 network of a converted model. ``state``: a file keeping per-point results so an
    interrupted run resumes; ``max_batches`` stops after that many new batches (a partial report).
    Under ``torchrun`` every rank takes every world-th batch and the counts are summed. ``amp``:
    ``"bf16"``/``"fp16"`` runs the model's forward passes under autocast (attacks included).
    """
    t0 = time.time()
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"evaluate takes an nn.Module, got a {type(model).__name__}; load it first "
                        "(robust_surgery.load_model('zoo:...' or a file))")
    from robust_surgery.limits import check_seed

    check_seed(seed)
    if attacks is not None and suite is not None:
        raise InvalidInputError("give a suite (--suite) or a list of attacks (--attack), not both")
    if attacks is None:
        suite = resolve_suite(suite or Suite.STANDARD)
        if suite == Suite.CUSTOM:
            raise InvalidInputError("suite 'custom' means a list of your own: give attacks=[...] (--attack)")
        spec = SUITES[suite]
        attacks = list(spec.attacks)
        if checks is None and spec.checks is not None:
            checks = spec.checks
    else:
        suite = Suite.CUSTOM
    if isinstance(attacks, str) or not all(isinstance(a, str) for a in attacks):
        raise InvalidTypeError(f"attacks takes a list of attack names such as ['fgsm', 'pgd'], got {attacks!r}")
    attacks = list(dict.fromkeys(a.strip().lower() for a in attacks if a.strip()))
    if not attacks:
        raise InvalidInputError(f"no attack given (--attack is empty): name at least one of {', '.join(attack_names())}")
    unknown = [a for a in attacks if a not in attack_names() + SOURCE_ATTACKS]
    if unknown:
        raise InvalidInputError(f"unknown attack {unknown[0]!r} (--attack): choose from {', '.join(attack_names() + SOURCE_ATTACKS)}")
    if threat not in ("Linf", "L2"):
        raise InvalidInputError(f"threat must be Linf or L2, got {threat!r}")
    if isinstance(eps, (int, float)):
        raise InvalidTypeError(f"eps takes a list of budgets such as [0.1, 0.3], got the number {eps!r}")
    if eps is not None:
        eps = check_budgets(eps)
        if not eps:
            raise InvalidInputError("eps is empty: give budgets such as 0,0.1,8/255")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise InvalidInputError(f"max_batches (--max-batches) must be a whole number >= 1 (the new batches to run before "
                                f"stopping), got {max_batches!r}")
    if state is not None:
        check_output_path(state, make_parents=True, what="state file (--state)")
    resolved = resolve_data(data, "test", n=n, data_root=data_root)
    x, y, dataset = resolved.images, resolved.labels, resolved.name
    _check_inputs(x, y, batch_size, steps, restarts, queries, alpha, mean, std)
    check_unit_range(x)
    if eps is None:
        eps = default_eps(dataset, threat)
    eps = sorted({float(e) for e in eps})
    converted = is_converted(model)
    if not converted and any(a in SOURCE_ATTACKS for a in attacks):
        raise InvalidInputError("the transfer and bpda attacks take their gradients from a converted model's λ = 1 network "
                         "or straight-through surrogate; this model has no NRPM layers (use fgsm, pgd, ...)")
    if compare_original and not converted:
        raise InvalidInputError("compare_original needs a converted model (one with NRPM layers); this model has none")
    if checks is None:
        checks = converted
    if checks and max(eps) == 0:
        raise InvalidInputError("the sanity checks need an ε > 0; add one or turn checks off")
    variants = (["nrpm", "original"] if compare_original else ["nrpm"]) if converted else ["model"]
    N = len(x)
    if N == 0:
        raise InvalidInputError("no points to evaluate")
    dev = torch.device(device) if device else next(model.parameters(), torch.empty(0)).device
    jobs = plan_jobs(attacks, eps, threat=threat, variants=variants, checks=checks, steps=steps, alpha=alpha,
                     restarts=restarts, queries=queries, x_numel=x[0].numel(), per_attack=per_attack)
    rank, world = dist_info()
    n_batches = math.ceil(N / batch_size)

    # per-point results, filled batch by batch (and kept in the state file)
    state_path = Path(f"{state}.rank{rank}") if state and world > 1 else (Path(state) if state else None)
    # the run's record (weights and data digests, every setting) matters only to a state file
    record = _record(model, x, y, jobs, threat=threat, batch_size=batch_size, seed=seed, mean=mean,
                     std=std, amp=amp, suite=suite.value) if state_path else None
    st = {"record": pack_record(record) if record else None, "done": [],
          "clean": {v: torch.zeros(N, dtype=torch.int8) for v in variants},
          "robust": {j.key: torch.zeros(N, dtype=torch.int8) for j in jobs},
          "grad_zero": torch.zeros(N, dtype=torch.int8), "nondeterministic": 0}
    if state_path and state_path.exists():
        fix = "delete it or give another --state"
        saved = resume_file(state_path, record, "state file", fix)
        if set(saved.get("robust", {})) != set(st["robust"]) or set(saved.get("clean", {})) != set(st["clean"]):
            raise StateMismatchError(f"state file {state_path} is damaged (its results do not match its record); {fix}")
        st = saved

    was_training = model.training
    model.eval()
    target = AttackTarget(model, mean, std, amp=resolve_amp(amp)).to(dev).eval()  # torchattacks restores this mode after attacking
    n_classes = count_classes(target, x[:1].to(dev))
    check_labels_fit(y, n_classes)
    done_before = set(st["done"])
    mine = [b for b in range(n_batches) if b % world == rank and b not in done_before]
    if max_batches is not None:
        mine = mine[:max_batches]
    plan_units = units(jobs)
    prog = EvalProgress(progress and rank == 0, jobs,
                        [min(N, (b + 1) * batch_size) - b * batch_size for b in mine], n_batches)
    try:
        with prog:
            target.on_forward = prog.tick
            for bi, b in enumerate(mine):
                sl = slice(b * batch_size, min(N, (b + 1) * batch_size))
                xb, yb = x[sl].to(dev), y[sl].to(dev)
                clean = {}
                for v in variants:
                    with _variant_context(v)(model), torch.no_grad():
                        out1 = target(xb)
                        if not torch.isfinite(out1).all():
                            bad = int((~torch.isfinite(out1)).any(1).sum())
                            raise NonFiniteError(
                                f"the model ({v}) outputs NaN or infinite logits for {bad} of the {len(xb)} points of "
                                f"batch {b + 1}; accuracies would be meaningless, so none are reported. Check the "
                                "model (a float16 NRPM layer overflows: use float32) and its inputs")
                        clean[v] = out1.argmax(1) == yb
                        if v == variants[0] and checks and not torch.equal(out1, target(xb)):
                            st["nondeterministic"] += 1
                    st["clean"][v][sl] = clean[v].to(torch.int8).cpu()
                if checks:
                    xg = xb.clone().requires_grad_(True)
                    (g,) = torch.autograd.grad(F.cross_entropy(target(xg), yb, reduction="sum"), xg)
                    st["grad_zero"][sl] = (g.flatten(1).abs().amax(1) == 0).to(torch.int8).cpu()
                ji = 0
                for unit in plan_units:  # each job attacks the points every earlier job of its unit left robust
                    alive = clean[unit[0].variant].clone()
                    for j in unit:
                        idx = alive.nonzero().flatten()
                        prog.start_job(bi, b, ji, j, len(idx))
                        if len(idx) and j.cfg.eps > 0:
                            x_adv = _attack_batch(j, target, model, xb[idx], yb[idx], n_classes, seed + b, seed,
                                                  idx.cpu() + sl.start)
                            with _variant_context(j.variant)(model), torch.no_grad():
                                ok = target(x_adv).argmax(1) == yb[idx]
                            if j.cfg.name == "cw":  # unbounded attack: success only within the budget
                                ok = ok | ~within_budget(xb[idx], x_adv, j.cfg)
                            alive[idx] = ok
                        st["robust"][j.key][sl] = alive.to(torch.int8).cpu()
                        prog.end_job(j)
                        ji += 1
                st["done"] = sorted(set(st["done"]) | {b})
                if state_path:
                    with atomic_path(state_path, make_parents=True) as tmp:
                        torch.save(st, tmp)
    finally:
        target.on_forward = None
        model.train(was_training)

    done = torch.zeros(n_batches, dtype=torch.int64)
    done[st["done"]] = 1
    all_reduce_sum_(done, world)
    complete = bool((done > 0).all())
    clean_vecs = {v: all_reduce_sum_(st["clean"][v].to(torch.int64), world).bool() for v in variants}
    clean_counts = {v: int(c.sum()) for v, c in clean_vecs.items()}
    robust = {k: all_reduce_sum_(t.to(torch.int64), world).bool() for k, t in st["robust"].items()}
    grad_zero = int(all_reduce_sum_(st["grad_zero"].to(torch.int64), world).sum())
    nondet = int(all_reduce_sum_(torch.tensor(st["nondeterministic"]), world))

    results = []
    for v in variants:
        for e in eps:
            group = [j for j in jobs if j.variant == v and j.cfg.eps == e and j.worst]
            finals = {}
            for j in group:  # a unit's last job holds the unit's per-point worst
                finals[j.unit] = robust[j.key]
            worst = clean_vecs[v].clone()
            for f in finals.values():
                worst &= f
            before = clean_vecs[v].clone()  # robust to every attack ranked earlier
            for j in group:
                new = int((before & ~robust[j.key]).sum())
                before &= robust[j.key]
                results.append(_row(j, robust[j.key], N, in_worst=True, worst_count=int(worst.sum()), broken_new=new,
                                    cascade=not per_attack, n_classes=n_classes))
        for j in jobs:
            if j.variant == v and not j.worst:
                results.append(_row(j, robust[j.key], N, in_worst=False, worst_count=None, broken_new=None,
                                    cascade=not per_attack, n_classes=n_classes))
    adaptive = not converted or all(any(j.source == s and j.cfg.eps == e and j.variant == variants[0] for j in jobs)
                                    for s in SOURCE_ATTACKS for e in eps if e > 0)
    note = SUITES[suite].note if suite in SUITES else ""
    if converted and not adaptive:
        note = (note + "; " if note else "") + ("the worst case is NOT adaptive: transfer from λ = 1 and BPDA did "
                                                "not run at every ε (drop --no-checks or use --suite standard)")
    report = EvalReport(
        dataset=dataset,
        architecture=architecture or get_meta(model).get("arch") or type(model).__name__,
        threat_model=threat, n=N, seed=seed, eps=eps, clean=clean_counts, results=results,
        complete=complete, seconds=time.time() - t0, batches_done=int((done > 0).sum()), batches_total=n_batches,
        suite=suite.value, cascade=not per_attack, adaptive=adaptive, note=note,
    )
    if checks and complete:
        report.checks = run_checks(report, grad_zero=grad_zero, nondeterministic_batches=nondet)
    return report


def _row(job: Job, robust: torch.Tensor, N: int, *, in_worst: bool, worst_count: int | None, broken_new: int | None,
         cascade: bool, n_classes: int) -> dict:
    c = job.cfg
    return {
        # plain strings in rows: they go to JSON and to state files read with weights_only=True
        "model": job.variant, "attack": c.name, "label": job.label, "group": job.group, "source": job.source.value,
        "check": None if job.check is None else job.check.value, "eps": c.eps,
        "eps_str": format_eps(c.eps), "steps": c.steps if c.name in ("pgd", "cw", "apgd-ce", "apgd-t", "fab-t") else None,
        "restarts": c.restarts if c.name == "pgd" else None,
        "queries": c.queries if c.name == "square" else None,
        "targets": max(1, min(9, n_classes - 1)) if c.name in ("apgd-t", "fab-t") else None,
        "robust_count": int(robust.sum()),
        "robust_acc": 100.0 * int(robust.sum()) / N, "broken_new": broken_new, "cascade": cascade, "in_worst": in_worst,
        "worst_robust_acc": None if worst_count is None else 100.0 * worst_count / N, "key": job.key,
    }
