"""Clean vs adversarial (pre)training of a plain model: the two sides of the purification story.

``pretrain(model, data, adversarial="pgd", eps=..., threat="L2", ramp=1/3)`` trains every
parameter of an ordinary (unconverted) model in place on clean batches, FGSM/PGD batches made on
the fly against the model (robust_surgery.evaluation.attacks over torchattacks), or batches with random noise
of the same norm (the control: as much input change, no adversary). The budget may be ramped in
linearly over the first ``ramp`` fraction of the training steps. Data: ``mnist``, ``cifar10``, a
path, an ``(images, labels)`` pair, or the synthetic sparse-coding task (``synthetic:d=64,...``
or a :class:`~robust_surgery.purification.synthetic.SparseCodingTask`). NRPM-converted models go through
:func:`robust_surgery.finetune` instead.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.evaluation.attacks import THREATS, AttackTarget, count_classes
from robust_surgery.io.runrecord import RECORD_VERSION, pack_record, resume_file, state_digest, tensor_digest
from robust_surgery.training.finetune import (FinetuneConfig, adversarial_batch, check_finetune_paths, load_train_val,
                                              lr_at_epoch)
from robust_surgery._device import amp_name, resolve_amp, resolve_device
from robust_surgery._loops import batch_seed, epoch_permutation, evaluate_accuracy
from robust_surgery._meta import set_meta
from robust_surgery.purification.synthetic import SparseCodingTask
from robust_surgery.training.loop import BatchLoss, make_optimizer, train_loop
from robust_surgery.errors import InvalidInputError

__all__ = ["ADVERSARIAL", "PretrainConfig", "eps_at", "noise_batch", "pretrain"]

ADVERSARIAL = (None, "fgsm", "pgd", "noise")


@dataclass(frozen=True)
class PretrainConfig:
    """Training settings (recorded in the model's manifest as ``training``).

    ``adversarial``: None (clean), ``fgsm``, ``pgd`` (``pgd_steps``, step 2.5·ε/steps, random
    start) or ``noise`` (uniformly random direction, norm ε in ``threat``); ``eps`` in input
    (pixel) units; ``ramp``: the fraction of all steps over which ε grows linearly from 0.
    ``optimizer``: ``adam`` or ``sgd`` (momentum 0.9); ``schedule``: constant, cosine or step.
    ``val_n``: points held out at the end of the training split (0: none).
    """

    adversarial: str | None = None
    eps: float = 0.0
    threat: str = "Linf"
    pgd_steps: int = 5
    pgd_alpha: float | None = None  # the PGD step; None: 2.5·ε/steps
    ramp: float = 0.0
    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "constant"
    batch_size: int = 128
    seed: int = 0
    val_n: int = 0
    n_train: int | None = None
    amp: str | None = None  # None: float32; "bf16"/"fp16": autocast

    def __post_init__(self):
        if self.adversarial not in ADVERSARIAL:
            raise InvalidInputError(f"adversarial must be none, fgsm, pgd or noise, got {self.adversarial!r}")
        if self.threat not in THREATS:
            raise InvalidInputError(f"threat must be one of {', '.join(THREATS)}, got {self.threat!r}")
        # the optimiser, schedule and size checks are fine-tuning's (same fields, same messages)
        FinetuneConfig(paradigm=3, adversarial=None, eps=self.eps, epochs=self.epochs, lr=self.lr,
                       optimizer=self.optimizer, schedule=self.schedule, batch_size=self.batch_size, val_n=self.val_n)
        if not 0 <= self.ramp < 1:
            raise InvalidInputError(f"ramp is the fraction of training over which ε grows, in [0, 1); got {self.ramp}")
        if self.adversarial and self.eps == 0:
            raise InvalidInputError(f"adversarial={self.adversarial!r} needs a budget eps > 0")
        resolve_amp(self.amp)
        if self.pgd_steps < 1:
            raise InvalidInputError(f"pgd_steps must be >= 1, got {self.pgd_steps}")


def eps_at(cfg: PretrainConfig, step: int, total_steps: int) -> float:
    """The budget at training step ``step`` of ``total_steps``: a linear ramp from 0 over the first
    ``cfg.ramp`` fraction, then ``cfg.eps``."""
    ramp_steps = cfg.ramp * total_steps
    if ramp_steps <= 0 or step >= ramp_steps:
        return cfg.eps
    return cfg.eps * (step + 1) / ramp_steps


def noise_batch(x: torch.Tensor, eps: float, threat: str, generator: torch.Generator) -> torch.Tensor:
    """x plus random noise of size ε (L2: a uniformly random direction of norm ε; Linf: random
    signs times ε), clipped to [0, 1]. x: (N, ...) in [0, 1]."""
    g = torch.randn(x.shape, generator=generator).to(x.device)
    if threat == "L2":
        d = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    else:
        d = torch.sign(g)
    return (x + eps * d).clamp(0, 1)


def pretrain(
    model: nn.Module,
    data,
    *,
    adversarial: str | None = None,
    eps: float = 0.0,
    threat: str = "Linf",
    pgd_steps: int = 5,
    ramp: float = 0.0,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "constant",
    batch_size: int = 128,
    seed: int = 0,
    val_n: int = 0,
    n_train: int | None = None,
    amp: str | None = None,
    data_root=None,
    device=None,
    progress: bool = False,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Train every parameter of ``model`` in place, clean or adversarially; returns ``(model, history)``.

    data: ``mnist``, ``cifar10``, a path, ``synthetic[:key=value,...]``, a SparseCodingTask or an
    ``(images (N, ...) in [0, 1], labels (N,))`` pair; its last ``val_n`` points are held out and
    ``n_train`` keeps the first n of the rest. ``eps`` is in input units ([0, 1] pixels; for the
    synthetic task use ``task.pixel_eps``). history: one dict per epoch (train loss, lr, the ε
    reached, validation clean accuracy in % when ``val_n`` > 0, seconds). The final epoch is kept.
    """
    adversarial = None if adversarial in (None, "", "none", "clean") else adversarial
    cfg = PretrainConfig(adversarial=adversarial, eps=eps, threat=threat, pgd_steps=pgd_steps, ramp=ramp,
                         epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay, schedule=schedule,
                         batch_size=batch_size, seed=seed, val_n=val_n, n_train=n_train,
                         amp=amp_name(amp))
    if any(type(m).__name__.startswith("NRPM") for m in model.modules()):
        raise InvalidInputError("pretrain trains plain models; for an NRPM-converted model use robust_surgery.finetune "
                         "(surgery finetune)")
    if checkpoint_dir is not None and cfg.adversarial == "noise":
        raise InvalidInputError("checkpoint_dir cannot resume noise training (its generator is not checkpointed)")
    ckpt = check_finetune_paths(checkpoint_dir, None)
    (xt, yt), (xv, yv) = load_train_val(data, cfg.val_n, cfg.n_train, data_root)
    dev = resolve_device(device) if device else next(model.parameters()).device
    model.to(dev)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    target = AttackTarget(model, amp=resolve_amp(cfg.amp)).to(dev).eval()
    n_classes = count_classes(target, xt[:1].to(dev))
    record = resume = None
    if ckpt is not None:
        record = {"version": RECORD_VERSION, "starting weights": state_digest(model), "training data": tensor_digest(xt, yt),
                  "validation data": tensor_digest(xv, yv), "settings": asdict(cfg)}
        if ckpt.exists():
            resume = resume_file(ckpt, record, "checkpoint", "delete it or use another checkpoint folder")
    torch.manual_seed(cfg.seed)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 4242)
    steps = math.ceil(len(xt) / cfg.batch_size)
    total_steps = steps * cfg.epochs
    reached = {"eps": 0.0}  # the ε of the epoch's last step

    def step(xb, yb, epoch, s):
        eps_now = eps_at(cfg, epoch * steps + s, total_steps) if cfg.adversarial else 0.0
        reached["eps"] = eps_now
        if cfg.adversarial == "noise":
            xb = noise_batch(xb, eps_now, cfg.threat, noise_gen)
        elif cfg.adversarial:
            # finetune's attack step reads adversarial, eps, threat and pgd_steps
            xb = adversarial_batch(model, target, dataclasses.replace(cfg, eps=eps_now), xb, yb,
                                   batch_seed(cfg.seed, epoch, s), n_classes)
        model.train()
        return BatchLoss(F.cross_entropy(target(xb), yb))

    def end_epoch(epoch):
        row = {"eps": reached["eps"]}
        if len(xv):
            row["val_clean_acc"] = 100.0 * evaluate_accuracy(target, xv, yv, batch_size=500, device=dev)[0] / len(xv)
        return row

    # finetune's schedules (lr_at_epoch reads lr, epochs, schedule); the final epoch is kept
    history = train_loop(model, opt, xt, yt, step, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         order=lambda epoch: epoch_permutation(len(xt), cfg.seed, epoch),
                         lr_at=lambda epoch: lr_at_epoch(cfg, epoch), end_epoch=end_epoch, device=dev,
                         progress=progress, checkpoint=ckpt, record=pack_record(record) if ckpt else None,
                         resume=resume, checkpoint_every=checkpoint_every).history
    model.eval()
    data_name = data.spec() if isinstance(data, SparseCodingTask) else data if isinstance(data, str) else "custom"
    set_meta(model, training={"kind": "pretrain", "data": str(data_name), **asdict(cfg), "history": history})
    return model, history
