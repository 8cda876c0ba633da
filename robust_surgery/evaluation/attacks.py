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
    "build_attack",
    "within_budget",
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
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 amp: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.amp = amp
        if (mean is None) != (std is None):
            raise InvalidInputError("give both mean and std (per channel), or neither")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        if self.steps < 1 or self.restarts < 1 or self.queries < 1:
            raise InvalidInputError(f"steps, restarts and queries must be >= 1, got {self.steps}, {self.restarts}, {self.queries}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise InvalidInputError(f"alpha (the step size) must be a finite number > 0, got {self.alpha}")

    @property
    def key(self) -> str:
        extra = ""
        if self.name == "pgd":
            extra = f"-s{self.steps}" + (f"-r{self.restarts}" if self.restarts > 1 else "")
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


@register_attack("pgd")
def _pgd(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    kind = torchattacks.PGD if cfg.threat == "Linf" else torchattacks.PGDL2

    def make():
        return kind(target, eps=cfg.eps, alpha=step_size(cfg), steps=cfg.steps, random_start=True)

    return make() if cfg.restarts <= 1 else torchattacks.MultiAttack([make() for _ in range(cfg.restarts)])


@register_attack("cw")
def _cw(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
    return torchattacks.CW(target, c=1.0, kappa=0.0, steps=max(cfg.steps, 50), lr=0.01)


@register_attack("autoattack")
def _autoattack(cfg: AttackConfig, target: nn.Module, n_classes: int, seed: int):
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
