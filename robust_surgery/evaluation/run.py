"""Robustness evaluation: attacks over an ε sweep, the sanity report card, sharding, resuming.

Robust accuracy (``docs/evaluation.md``) is the fraction of points classified
correctly on the clean input **and** after every attack run at that ε; the headline number
is the worst over all attacks, per point. Points are processed in fixed global batches: batch
``b`` is attacked with seed ``seed + b`` whatever process runs it, so sharded runs
(``torchrun``) and resumed runs give exactly the numbers of one uninterrupted process.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.evaluation.attacks import AttackConfig, AttackTarget, attack_names, build_attack, check_labels_fit, check_unit_range, within_budget
from robust_surgery.data.resolve import resolve_data
from robust_surgery.errors import InvalidInputError, InvalidTypeError, NonFiniteError, StateMismatchError
from robust_surgery.evaluation.budgets import check_budgets, format_eps, parse_eps
from robust_surgery.evaluation.checks import CheckResult, run_checks
from robust_surgery.evaluation.kinds import CheckJob, Source
from robust_surgery._files import atomic_path, check_output_path
from robust_surgery._device import amp_name, resolve_amp
from robust_surgery._dist import all_reduce_sum_, dist_info
from robust_surgery._loops import work_progress
from robust_surgery._meta import get_meta
from robust_surgery.nn.layers import linear_mode, straight_through_mode
from robust_surgery.surgery.convert import is_converted
from robust_surgery.io.runrecord import RECORD_VERSION, nrpm_settings, pack_record, resume_file, state_digest, tensor_digest

__all__ = ["Job", "EvalReport", "evaluate", "default_eps", "format_eps", "parse_eps"]

SOURCE_ATTACKS = (Source.TRANSFER, Source.BPDA)  # PGD with the gradients of the λ = 1 network / the straight-through surrogate
_DEFAULT_EPS = {("mnist", "Linf"): (0.3,), ("mnist", "L2"): (2.0,), ("cifar10", "Linf"): (8 / 255,),
                ("cifar10", "L2"): (0.5,)}


def default_eps(dataset: str, threat: str) -> tuple[float, ...]:
    """The budget people compare against: MNIST L∞ 0.3 (L2 2.0), CIFAR-10 L∞ 8/255 (L2 0.5)."""
    try:
        return _DEFAULT_EPS[(dataset, threat)]
    except KeyError:
        raise InvalidInputError(f"no default ε for dataset {dataset!r} under {threat}; give eps=... (--eps)") from None


@dataclass(frozen=True)
class Job:
    """One attack on one model variant. ``source``: 'direct' (attack the variant itself),
    'transfer' (examples made on the original λ = 1 model, replayed here) or 'bpda' (gradients of
    the linear surrogate). ``worst``: counts in the worst-case robust accuracy."""

    variant: str
    cfg: AttackConfig
    source: Source = Source.DIRECT
    worst: bool = True
    check: CheckJob | None = None

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.source}:{self.cfg.key}"


@dataclass
class EvalReport:
    """What an evaluation measured. Accuracies in percent over ``n`` points; ``to_dict()`` uses
    RobustBench's field names where they apply (clean_acc, autoattack_acc, eps, dataset,
    threat_model, architecture)."""

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
        """Robust accuracy (percent) of one attack at one ε: an attack name (direct), or
        ``"transfer"`` / ``"bpda"`` (PGD with the λ = 1 network's / the surrogate's gradients)."""
        source, name = (Source(attack), "pgd") if attack in SOURCE_ATTACKS else (Source.DIRECT, attack)
        for r in self.results:
            if r["model"] == variant and r["attack"] == name and r["eps"] == eps and r["source"] == source \
                    and r.get("check") is None:
                return r["robust_acc"]
        raise KeyError(f"no result for {variant}/{attack}@{eps}")

    def to_dict(self) -> dict:
        main = self.variants[0]
        worst = self.worst(main)
        head = max(self.eps)
        aa = [r for r in self.results if r["model"] == main and r["attack"] == "autoattack" and r["eps"] == head]
        d = {
            "dataset": self.dataset,
            "architecture": self.architecture,
            "threat_model": self.threat_model,
            "eps": format_eps(head),
            "n_examples": self.n,
            "seed": self.seed,
            "clean_acc": 100.0 * self.clean[main] / self.n,
            "robust_acc": worst.get(head),
            "autoattack_acc": aa[0]["robust_acc"] if aa else None,
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

        t = Table(caption="columns: ε; worst = per point, over every attack run at that ε",
                  title=f"Robust accuracy (%) on {self.dataset}, {self.threat_model}, n = {self.n}, seed {self.seed}"
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
                label = r["attack"] if r["source"] == Source.DIRECT else r["source"]
                if r["model"] == v and r.get("check") is None and label not in seen:
                    seen.append(label)
            for a in seen:
                cells = []
                for e in self.eps:
                    try:
                        cells.append(f"{self.robust_acc(v, a, e):.1f}")
                    except KeyError:
                        cells.append("")
                t.add_row(v, a, clean, *cells)
            worst = self.worst(v)
            t.add_row(v, "[bold]worst[/bold]", clean,
                      *[f"[bold]{worst[e]:.1f}[/bold]" if e in worst else "" for e in self.eps])
        parts = [t]
        if self.checks:
            c = Table(title="Sanity report card")
            for col in ("check", "result", "numbers"):
                c.add_column(col)
            for ch in self.checks:
                mark = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "[yellow]n/a[/yellow]"}[ch.passed]
                c.add_row(ch.name, mark, ch.detail)
            parts.append(c)
        return Group(*parts)


# --------------------------------------------------------------------------------------------
# Data and model preparation
# --------------------------------------------------------------------------------------------
def _variant_context(variant: str):
    return linear_mode if variant == "original" else (lambda m: contextlib.nullcontext(m))


def _plan(attacks: Sequence[str], eps: Sequence[float], threat: str, variants: list[str], checks: bool,
          steps: int, alpha, restarts: int, queries: int, x_numel: int) -> list[Job]:
    def cfg(name, e, **kw):
        base = dict(threat=threat, steps=steps, alpha=alpha, restarts=restarts, queries=queries)
        base.update(kw)
        return AttackConfig(name, e, **base)

    # "transfer" and "bpda" are PGD whose gradients come from the λ = 1 network or the straight-through
    # surrogate (SOURCE_ATTACKS); they attack the converted model itself, at every ε
    jobs = [Job(v, cfg("pgd", e), source=Source(a)) if a in SOURCE_ATTACKS else Job(v, cfg(a, e))
            for v in variants for a in attacks for e in eps if a not in SOURCE_ATTACKS or v == "nrpm"]
    if checks:
        main = variants[0]
        e = max(eps)
        have = {(j.cfg.name, j.cfg.eps) for j in jobs if j.variant == main and j.source == Source.DIRECT}
        keys = {j.key for j in jobs}
        for name, check in (("fgsm", CheckJob.FGSM_AT_MAX_EPS), ("pgd", CheckJob.PGD_AT_MAX_EPS)):
            if (name, e) not in have:
                jobs.append(Job(main, cfg(name, e), check=check))
        jobs.append(Job(main, cfg("pgd", e, steps=2 * steps, restarts=max(2, restarts)), check=CheckJob.PGD_STRONGER))
        jobs.append(Job(main, cfg("square", e), check=CheckJob.SQUARE))
        huge = 1.0 if threat == "Linf" else math.sqrt(x_numel)
        jobs.append(Job(main, cfg("pgd", huge, alpha=2.5 * huge / steps), worst=False, check=CheckJob.HUGE_EPS))
        if main == "nrpm":
            for source in SOURCE_ATTACKS:
                job = Job(main, cfg("pgd", e), source=source, check=CheckJob(source.value))
                if job.key not in keys:  # asked for with --attack already: the check reads that row
                    jobs.append(job)
    return jobs


def _record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, jobs: list[Job], *, threat: str, batch_size: int,
            seed: int, mean, std, amp=None) -> dict:
    """Everything that changes an evaluation's numbers (see :mod:`robust_surgery.io.runrecord`)."""
    extra = {} if amp_name(amp) is None else {"amp": amp_name(amp)}
    return {**extra,
        "version": RECORD_VERSION, "threat model": threat, "points": len(x), "batch size": batch_size, "seed": seed,
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
        "model weights": state_digest(model), "NRPM settings": nrpm_settings(model), "data": tensor_digest(x, y),
        "attacks": [{**asdict(j.cfg), "variant": j.variant, "source": j.source, "check": j.check, "in worst": j.worst,
                     "key": j.key} for j in jobs],
    }


def _check_inputs(x: torch.Tensor, y: torch.Tensor, batch_size, steps, restarts, queries, alpha, mean, std) -> None:
    for name, value in (("batch_size (--batch-size)", batch_size), ("steps (--steps)", steps),
                        ("restarts (--restarts)", restarts), ("queries (--queries)", queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a whole number >= 1, got {value!r}")
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
def _attack_batch(job: Job, target: AttackTarget, model: nn.Module, xb, yb, n_classes: int, seed: int) -> torch.Tensor:
    """Adversarial examples of one batch for one job (x itself when ε = 0)."""
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
        x_adv = attack(xb, yb)
    return x_adv.detach()


def evaluate(
    model: nn.Module,
    data,
    *,
    attacks: Sequence[str] = ("fgsm", "pgd"),
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
    """Evaluate ``model`` under ``attacks`` at every ε of ``eps`` on ``data``.

    data: ``"mnist"``, ``"cifar10"``, a path (ImageFolder or .pt), a TensorDataset or an
    ``(images (N, C, H, W) in [0, 1], labels (N,))`` pair; ``n`` takes the first n points.
    attacks: ``fgsm``, ``pgd`` (random start, ``steps``, step ``alpha`` = 2.5·ε/steps by default,
    ``restarts``), ``cw`` (L2; success only within ε), ``autoattack`` (standard, seeded),
    ``apgd`` (AutoAttack's APGD-CE then APGD-DLR, 100 steps each: its untargeted half, for when
    the standard version does not fit the time), ``square`` (``queries``). ``threat``: ``Linf`` or ``L2``. ``compare_original`` also evaluates
    the λ = 1 network of a converted model. ``checks`` (default: on for converted models) adds
    the sanity report card. ``state``: a file keeping per-point results so an interrupted run
    resumes; ``max_batches`` stops after that many new batches (a partial report). Under
    ``torchrun`` every rank takes every world-th batch and the counts are summed. ``amp``:
    ``"bf16"``/``"fp16"`` runs the model's forward passes under autocast (attacks included).
    """
    t0 = time.time()
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"evaluate takes an nn.Module, got a {type(model).__name__}; load it first "
                        "(robust_surgery.load_model('zoo:...' or a file))")
    if isinstance(attacks, str) or not all(isinstance(a, str) for a in attacks):
        raise InvalidTypeError(f"attacks takes a list of attack names such as ['fgsm', 'pgd'], got {attacks!r}")
    attacks = [a.strip().lower() for a in attacks if a.strip()]
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
        raise InvalidInputError("the sanity checks need an ε > 0 (they attack at the largest ε); add one or turn checks off")
    variants = (["nrpm", "original"] if compare_original else ["nrpm"]) if converted else ["model"]
    N = len(x)
    if N == 0:
        raise InvalidInputError("no points to evaluate")
    dev = torch.device(device) if device else next(model.parameters(), torch.empty(0)).device
    jobs = _plan(attacks, eps, threat, variants, checks, steps, alpha, restarts, queries, x[0].numel())
    rank, world = dist_info()
    n_batches = math.ceil(N / batch_size)

    # per-point results, filled batch by batch (and kept in the state file)
    state_path = Path(f"{state}.rank{rank}") if state and world > 1 else (Path(state) if state else None)
    # the run's record (weights and data digests, every setting) matters only to a state file
    record = _record(model, x, y, jobs, threat=threat, batch_size=batch_size, seed=seed, mean=mean,
                     std=std, amp=amp) if state_path else None
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
    with torch.no_grad():
        n_classes = target(x[:1].to(dev)).shape[1]
    check_labels_fit(y, n_classes)
    done_before = set(st["done"])
    mine = [b for b in range(n_batches) if b % world == rank and b not in done_before]
    if max_batches is not None:
        mine = mine[:max_batches]
    bar = work_progress(progress and rank == 0)
    try:
        with bar:
            task = bar.add_task("evaluating", total=len(mine) * (len(jobs) + 1))
            for b in mine:
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
                bar.advance(task)
                for j in jobs:
                    bar.update(task, description=f"batch {b + 1}/{n_batches} {j.key}")
                    x_adv = _attack_batch(j, target, model, xb, yb, n_classes, seed + b)
                    with _variant_context(j.variant)(model), torch.no_grad():
                        adv_ok = target(x_adv).argmax(1) == yb
                    if j.cfg.name == "cw":  # unbounded attack: success only within the budget
                        adv_ok = adv_ok | ~within_budget(xb, x_adv, j.cfg)
                    st["robust"][j.key][sl] = (clean[j.variant] & adv_ok).to(torch.int8).cpu()
                    bar.advance(task)
                st["done"] = sorted(set(st["done"]) | {b})
                if state_path:
                    with atomic_path(state_path, make_parents=True) as tmp:
                        torch.save(st, tmp)
    finally:
        model.train(was_training)

    done = torch.zeros(n_batches, dtype=torch.int64)
    done[st["done"]] = 1
    all_reduce_sum_(done, world)
    complete = bool((done > 0).all())
    clean_counts = {v: int(all_reduce_sum_(st["clean"][v].to(torch.int64), world).sum()) for v in variants}
    robust = {k: all_reduce_sum_(t.to(torch.int64), world).bool() for k, t in st["robust"].items()}
    grad_zero = int(all_reduce_sum_(st["grad_zero"].to(torch.int64), world).sum())
    nondet = int(all_reduce_sum_(torch.tensor(st["nondeterministic"]), world))

    results = []
    for v in variants:
        for e in eps:
            group = [j for j in jobs if j.variant == v and j.cfg.eps == e and j.worst]
            worst = torch.ones(N, dtype=torch.bool)
            for j in group:
                worst &= robust[j.key]
            for j in group:
                results.append(_row(j, robust[j.key], N, in_worst=True, worst_count=int(worst.sum())))
        for j in jobs:
            if j.variant == v and not j.worst:
                results.append(_row(j, robust[j.key], N, in_worst=False, worst_count=None))
    report = EvalReport(
        dataset=dataset,
        architecture=architecture or get_meta(model).get("arch") or type(model).__name__,
        threat_model=threat, n=N, seed=seed, eps=eps, clean=clean_counts, results=results,
        complete=complete, seconds=time.time() - t0, batches_done=int((done > 0).sum()), batches_total=n_batches,
    )
    if checks and complete:
        report.checks = run_checks(report, grad_zero=grad_zero, nondeterministic_batches=nondet)
    return report


def _row(job: Job, robust: torch.Tensor, N: int, *, in_worst: bool, worst_count: int | None) -> dict:
    c = job.cfg
    return {
        # plain strings in rows: they go to JSON and to state files read with weights_only=True
        "model": job.variant, "attack": c.name, "source": job.source.value,
        "check": None if job.check is None else job.check.value, "eps": c.eps,
        "eps_str": format_eps(c.eps), "steps": c.steps if c.name in ("pgd", "cw") else None,
        "restarts": c.restarts if c.name == "pgd" else None, "robust_count": int(robust.sum()),
        "robust_acc": 100.0 * int(robust.sum()) / N, "in_worst": in_worst,
        "worst_robust_acc": None if worst_count is None else 100.0 * worst_count / N, "key": job.key,
    }
