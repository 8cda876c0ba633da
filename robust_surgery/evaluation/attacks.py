"""Attacks for evaluation: torchattacks objects built by name, and the guards they lack.

torchattacks assumes a model mapping [0, 1] images to one ``(N, C)`` logits tensor, in eval
mode. :class:`AttackTarget` makes any model fit (normalisation, tuple/dict outputs) and
:func:`check_unit_range` refuses inputs outside [0, 1] instead of letting them be clamped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from robust_surgery.errors import InvalidInputError, InvalidTypeError, MissingDependencyError

try:  # installed with --no-deps (its metadata pins an old requests it never imports): docs/safety.md
    import torchattacks
except ImportError:
    raise MissingDependencyError(
        'the attacks need torchattacks, which is not installed: pip install --no-deps "torchattacks==3.5.1" '
        "(--no-deps keeps its requests~=2.25.1 pin out; see docs/safety.md), or pip install 'robust-surgery[attacks]'"
    ) from None

__all__ = [
    "ATTACKS",
    "AttackSpec",
    "attack_names",
    "gradient_attacks",
    "register_attack",
    "step_size",
    "THREATS",
    "AttackTarget",
    "AttackConfig",
    "FGML2",
    "check_unit_range",
    "check_labels_fit",
    "count_classes",
    "build_attack",
    "within_budget",
    "AUTOATTACK_PARTS",
    "autoattack_parts",
    "PointSeededPGD",
    "point_seed",
]

THREATS = ("Linf", "L2")


def check_unit_range(x: torch.Tensor) -> None:
    """Raise a clear error unless every value of ``x`` is in [0, 1] (attacks assume pixels in [0, 1])."""
    if x.numel() and not torch.isfinite(x).all():
        from robust_surgery.errors import NonFiniteError

        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise NonFiniteError(f"{bad} of the {len(x)} inputs hold NaN or infinite pixels; the attacks need finite "
                             "images in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidInputError(
            f"inputs must be images in [0, 1] for the attacks (got min {lo:.4g}, max {hi:.4g}). Pass raw "
            "[0, 1] images and let the model normalise inside, or give --mean/--std (Python: mean=, std=)."
        )


def check_labels_fit(y: torch.Tensor, n_classes: int) -> None:
    """Raise a clear error unless every label of ``y`` is a class index below ``n_classes`` (the model's outputs)."""
    if len(y) and int(y.max()) >= n_classes:
        raise InvalidInputError(f"the labels reach {int(y.max())} but the model has {n_classes} outputs (classes 0.."
                         f"{n_classes - 1}): the data does not fit this model (wrong data set or model?)")


def _logits(out) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    if isinstance(out, dict):
        if "logits" in out:
            return out["logits"]
        tensors = [v for v in out.values() if torch.is_tensor(v)]
        if len(tensors) == 1:
            return tensors[0]
    logits = getattr(out, "logits", None)
    if torch.is_tensor(logits):
        return logits
    raise InvalidTypeError(
        f"the model returned a {type(out).__name__} the attacks cannot use; it must return logits (N, classes), "
        "a tuple/list whose first item is the logits, or a dict with a 'logits' entry"
    )


class AttackTarget(nn.Module):
    """The model as attacks see it: [0, 1] images in, one ``(N, classes)`` logits tensor out.

    ``mean``/``std`` (per channel) normalise inside when the model expects normalised inputs;
    ``amp`` (a dtype, e.g. torch.bfloat16) runs the model under autocast, logits returned in float32.
    ``on_forward``: an optional callable run before every forward pass (progress reporting).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 amp: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.amp = amp
        self.on_forward = None  # called once per forward pass (evaluation progress)
        if (mean is None) != (std is None):
            raise InvalidInputError("give both mean and std (per channel), or neither")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_forward is not None:
            self.on_forward()
        if self.mean is not None:
            x = (x - self.mean) / self.std
        if self.amp is None:
            out = _logits(self.model(x))
        else:
            with torch.autocast(x.device.type, dtype=self.amp):
                out = _logits(self.model(x)).float()
        if out.dim() != 2:
            raise InvalidTypeError(f"the model's logits must have shape (N, classes), got {tuple(out.shape)}")
        return out


def count_classes(target: nn.Module, x: torch.Tensor) -> int:
    """The number of classes ``target`` outputs for the images ``x`` (N, C, H, W); a clear error,
    naming the data's shape and the model's expected one where known, when the data does not fit
    the model (instead of torch's "mat1 and mat2 shapes cannot be multiplied")."""
    try:
        with torch.no_grad():
            return target(x[:1]).shape[1]
    except RuntimeError as e:
        text = str(e)
        if not any(k in text for k in ("shape", "size", "channels", "Expected", "dimension")):
            raise
        from robust_surgery._meta import get_meta

        want = ""
        arch = get_meta(getattr(target, "model", target)).get("arch") or ""
        if arch.startswith("zoo:"):
            try:
                from robust_surgery.io.zoo import get_entry

                want = f" it expects images of shape {tuple(get_entry(arch[4:]).input_shape)} (C, H, W) ({arch});"
            except Exception:
                want = ""
        raise InvalidInputError(f"the data does not fit the model: its images have shape {tuple(x.shape[1:])} (C, H, W);"
                                f"{want} torch says: {text.splitlines()[0]}. Give the data set the model was made for") from None


class FGML2(torchattacks.attack.Attack):
    """Single-step L2 attack (fast gradient method): x + ε·g/‖g‖₂, clipped to [0, 1]."""

    def __init__(self, model, eps: float = 1.0):
        super().__init__("FGML2", model)
        self.eps = eps
        self.supported_mode = ["default"]

    def forward(self, images, labels):
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        images.requires_grad = True
        loss = nn.CrossEntropyLoss()(self.get_logits(images), labels)
        (grad,) = torch.autograd.grad(loss, images)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        return (images + self.eps * grad / norm).clamp(0, 1).detach()


@dataclass(frozen=True)
class AttackConfig:
    """One attack at one budget. ``steps``/``alpha``: iterative attacks (alpha None: 2.5·ε/steps);
    ``restarts``: PGD restarts (worst per point); ``queries``: Square's query budget."""

    name: str
    eps: float
    threat: str = "Linf"
    steps: int = 20
    alpha: float | None = None
    restarts: int = 1
    queries: int = 1000

    def __post_init__(self):
        if self.name not in _REGISTRY:
            raise InvalidInputError(f"unknown attack {self.name!r}: choose from {', '.join(_REGISTRY)} "
                                    "(or add one with robust_surgery.register_attack)")
        if self.threat not in THREATS:
            raise InvalidInputError(f"threat must be one of {', '.join(THREATS)}, got {self.threat!r}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise InvalidInputError(f"eps must be a finite budget >= 0, got {self.eps}")
        from robust_surgery.limits import check_count

        check_count("steps", self.steps, "steps", flag="--steps")
        check_count("restarts", self.restarts, "restarts", flag="--restarts")
        check_count("queries", self.queries, "queries", flag="--queries")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise InvalidInputError(f"alpha (the step size) must be a finite number > 0, got {self.alpha}")

    @property
    def key(self) -> str:
        extra = ""
        if self.name == "pgd":
            extra = f"-s{self.steps}" + (f"-r{self.restarts}" if self.restarts > 1 else "")
        elif self.name in ("apgd-ce", "apgd-t", "fab-t"):
            extra = f"-s{self.steps}"
        elif self.name == "square":
            extra = f"-q{self.queries}"
        return f"{self.name}{extra}@{self.eps:g}"


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack. ``build(cfg, target, n_classes, seed)`` returns the torchattacks
    object; ``gradient``: it follows the model's gradients (the report card checks that no
    gradient-free attack beats these by much)."""

    name: str
    build: Callable[[AttackConfig, nn.Module, int, int], torchattacks.attack.Attack]
    gradient: bool = True


_REGISTRY: dict[str, AttackSpec] = {}


def register_attack(name: str, *, gradient: bool = True):
    """Decorator registering ``fn(cfg, target, n_classes, seed) -> torchattacks Attack`` under
    ``name``: ``evaluate(attacks=[name])`` and ``surgery evaluate --attack name`` then run it."""

    def deco(fn):
        _REGISTRY[name] = AttackSpec(name, fn, gradient)
        return fn

    return deco


def attack_names() -> tuple[str, ...]:
    """Every registered attack, built-in ones first."""
    return tuple(_REGISTRY)


def gradient_attacks() -> tuple[str, ...]:
    """The registered attacks that follow the model's gradients."""
    return tuple(n for n, a in _REGISTRY.items() if a.gradient)


def step_size(cfg: AttackConfig) -> float:
    """The step of an iterative attack: ``cfg.alpha``, else 2.5·ε/steps (Madry et al.'s rule)."""
    return cfg.alpha if cfg.alpha is not None else 2.5 * cfg.eps / max(cfg.steps, 1)


@register_attack("fgsm")
def _fgsm(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    return torchattacks.FGSM(target, eps=cfg.eps) if cfg.threat == "Linf" else FGML2(target, eps=cfg.eps)


def point_seed(seed: int, index: int, restart: int = 0) -> int:
    """The seed of one point's random start: a function of the run's seed, the point's global index in
    the data and the restart alone, so the start does not depend on which other points share its batch
    (cascades, shards and batch sizes then attack each point identically)."""
    return (int(seed) * 0x9E3779B1 + int(index) * 0x85EBCA77 + int(restart) * 0xC2B2AE3D) % (2 ** 63)


class PointSeededPGD(torchattacks.attack.Attack):
    """PGD (L∞ or L2, random start, ``restarts`` runs keeping the first success per point).

    Without ``point_seeds`` it is torchattacks' ``PGD``/``PGDL2`` exactly (one run, the random start
    drawn from the global generator), as training uses it. With ``point_seeds`` (one int per point,
    see :func:`point_seed`) every point's random start of restart r is drawn from its own generator
    seeded ``point_seed(...)`` + r, so a point's result does not depend on its batch; restart r runs
    only on the points every earlier restart left classified correctly. Images (N, C, H, W) in [0, 1].
    """

    def __init__(self, model, eps: float, alpha: float, steps: int, threat: str = "Linf", restarts: int = 1):
        super().__init__("PGD", model)
        self.eps, self.alpha, self.steps, self.threat, self.restarts = eps, alpha, steps, threat, restarts
        self.point_seeds: torch.Tensor | None = None
        self.supported_mode = ["default"]

    def _plain(self):
        kind = torchattacks.PGD if self.threat == "Linf" else torchattacks.PGDL2
        return kind(self.model, eps=self.eps, alpha=self.alpha, steps=self.steps, random_start=True)

    def _start(self, x: torch.Tensor, restart: int) -> torch.Tensor:
        noise = []
        for s in self.point_seeds.tolist():
            g = torch.Generator().manual_seed(int(s) + restart)
            if self.threat == "Linf":
                noise.append(torch.empty(x.shape[1:]).uniform_(-self.eps, self.eps, generator=g))
            else:  # a uniformly random radius along a Gaussian direction, as torchattacks' PGDL2
                d = torch.empty(x.shape[1:]).normal_(generator=g)
                r = torch.empty(()).uniform_(0, 1, generator=g)
                noise.append(d * (r / d.norm().clamp_min(1e-12) * self.eps))
        return (x + torch.stack(noise).to(x.device, x.dtype)).clamp(0, 1)

    def _run(self, x: torch.Tensor, y: torch.Tensor, restart: int) -> torch.Tensor:
        adv = self._start(x, restart).detach()
        n = len(x)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            (g,) = torch.autograd.grad(nn.functional.cross_entropy(self.get_logits(adv), y), adv)
            if self.threat == "Linf":
                adv = adv.detach() + self.alpha * g.sign()
                adv = (x + (adv - x).clamp(-self.eps, self.eps)).clamp(0, 1).detach()
            else:
                g = g / (g.reshape(n, -1).norm(dim=1) + 1e-10).view(n, *([1] * (x.dim() - 1)))
                d = adv.detach() + self.alpha * g - x
                factor = (self.eps / d.reshape(n, -1).norm(dim=1)).clamp(max=1.0)
                adv = (x + d * factor.view(n, *([1] * (x.dim() - 1)))).clamp(0, 1).detach()
        return adv

    def forward(self, images, labels):
        images, labels = images.clone().detach().to(self.device), labels.clone().detach().to(self.device)
        if self.point_seeds is None and self.restarts == 1:
            return self._plain()(images, labels)
        if self.point_seeds is None:
            return torchattacks.MultiAttack([self._plain() for _ in range(self.restarts)])(images, labels)
        out = images.clone()
        alive = torch.ones(len(images), dtype=torch.bool, device=images.device)
        all_seeds = self.point_seeds
        try:
            for r in range(self.restarts):
                idx = alive.nonzero().flatten()
                if len(idx) == 0:
                    break
                self.point_seeds = all_seeds[idx.cpu()]
                adv = self._run(images[idx], labels[idx], r)
                out[idx] = adv
                with torch.no_grad():
                    alive[idx] = self.get_logits(adv).argmax(1) == labels[idx]
        finally:
            self.point_seeds = all_seeds
        return out


@register_attack("pgd")
def _pgd(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    return PointSeededPGD(target, cfg.eps, step_size(cfg), cfg.steps, cfg.threat, cfg.restarts)


@register_attack("cw")
def _cw(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    return torchattacks.CW(target, c=1.0, kappa=0.0, steps=max(cfg.steps, 50), lr=0.01)


# AutoAttack's standard version (Croce & Hein 2020), at its own settings: APGD-CE (100 iterations),
# APGD-T (100 iterations per target, the 9 most likely wrong classes), FAB-T (100 iterations per
# target, 9 targets), Square (5000 queries), one restart each, one seed, in this order, each run on
# the points the earlier ones left robust. torchattacks' own AutoAttack builds the same four with
# their default 10 iterations: weaker. `evaluate` expands "autoattack" into these four jobs.
AUTOATTACK_STEPS = 100
AUTOATTACK_QUERIES = 5000
AUTOATTACK_PARTS = ("apgd-ce", "apgd-t", "fab-t", "square")


def autoattack_parts(eps: float, threat: str) -> list[AttackConfig]:
    """The four attacks of AutoAttack's standard version at budget ``eps``, in its order."""
    return [AttackConfig(name, eps, threat, steps=AUTOATTACK_STEPS, queries=AUTOATTACK_QUERIES)
            for name in AUTOATTACK_PARTS]


def _targets(n_classes: int) -> int:
    return max(1, min(9, n_classes - 1))


@register_attack("apgd-ce")
def _apgd_ce(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    return torchattacks.APGD(target, norm=cfg.threat, eps=cfg.eps, steps=cfg.steps, loss="ce", seed=seed, n_restarts=1)


@register_attack("apgd-t")
def _apgd_t(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    attack = torchattacks.APGDT(target, norm=cfg.threat, eps=cfg.eps, steps=cfg.steps, seed=seed, n_restarts=1,
                                n_classes=n_classes)
    attack.n_target_classes = _targets(n_classes)
    return attack


@register_attack("fab-t")
def _fab_t(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    attack = torchattacks.FAB(target, norm=cfg.threat, eps=cfg.eps, steps=cfg.steps, seed=seed, n_restarts=1,
                              multi_targeted=True, n_classes=n_classes)
    attack.n_target_classes = _targets(n_classes)
    return attack


@register_attack("autoattack")
def _autoattack(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    """AutoAttack (standard) as one object: its four attacks at their real settings, each on the survivors."""
    return torchattacks.MultiAttack([build_attack(part, target, n_classes, seed)
                                     for part in autoattack_parts(cfg.eps, cfg.threat)])


@register_attack("autoattack-10")
def _autoattack_10(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    """torchattacks' own ``AutoAttack(version="standard")``: the same four attacks with 10 iterations
    each (its defaults). Kept to reproduce numbers measured with it; weaker than ``autoattack``."""
    return torchattacks.AutoAttack(target, norm=cfg.threat, eps=cfg.eps, version="standard", n_classes=n_classes,
                                   seed=seed)


@register_attack("apgd")
def _apgd(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    """AutoAttack's untargeted pair: APGD-CE, then APGD-DLR on what survives (100 steps each)."""
    return torchattacks.MultiAttack([
        torchattacks.APGD(target, norm=cfg.threat, eps=cfg.eps, steps=100, loss=loss, seed=seed, n_restarts=1)
        for loss in ("ce", "dlr")])


@register_attack("square", gradient=False)
def _square(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    return torchattacks.Square(target, norm=cfg.threat, eps=cfg.eps, n_queries=cfg.queries, n_restarts=1, seed=seed)


#: The built-in attacks (register_attack adds more; attack_names() lists them all).
ATTACKS = attack_names()


def build_attack(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int) -> torchattacks.attack.Attack:
    """The torchattacks object for ``cfg`` against ``target`` (an :class:`AttackTarget`)."""
    return _REGISTRY[cfg.name].build(cfg, target, n_classes, seed)


def within_budget(x: torch.Tensor, x_adv: torch.Tensor, cfg: AttackConfig, slack: float = 1e-5) -> torch.Tensor:
    """Per point: is ``x_adv`` within ε of ``x`` in the threat norm? (C&W is unbounded.)"""
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if cfg.threat == "Linf" else d.norm(dim=1)
    return size <= cfg.eps + slack
