"""Paradigms 2 and 3: fine-tune λ alone, or every parameter, on clean or adversarial batches.

``finetune(model, data, paradigm=2, adversarial="fgsm", eps=0.2, epochs=1)`` trains a converted
model in place and returns it with its epoch history. Paradigm 2 trains only the per-layer
λ logits (every other parameter frozen, BatchNorm statistics frozen); paradigm 3 trains all
parameters and λ. Adversarial batches are made on the fly against the model being trained.
A held-out split of the training set picks the best epoch (robust accuracy when adversarial,
else clean); a checkpoint after every epoch lets a stopped run resume with the same result.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.evaluation.attacks import (AttackConfig, AttackTarget, build_attack, check_labels_fit, check_unit_range,
                                               count_classes)
from robust_surgery.errors import InvalidInputError, InvalidTypeError, NonFiniteError, OutputPathError
from robust_surgery._device import amp_name, resolve_amp, resolve_device
from robust_surgery._dist import all_reduce_sum_, dist_info, synchronized_batchnorm
from robust_surgery._files import check_output_path
from robust_surgery._loops import batch_seed, epoch_permutation, evaluate_accuracy
from robust_surgery._meta import set_meta
from robust_surgery.io.runrecord import RECORD_VERSION, pack_record, resume_file, state_digest, tensor_digest
from robust_surgery.surgery.convert import apply_paradigm, is_converted, nrpm_layers
from robust_surgery.training.loop import BatchLoss, make_optimizer, train_loop

__all__ = ["FinetuneConfig", "check_finetune_paths", "finetune", "load_train_val"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Training settings (recorded in the saved model's manifest).

    ``adversarial``: None (clean batches), ``"fgsm"`` or ``"pgd"`` (``pgd_steps``, step
    ``pgd_alpha``, default 2.5·ε/steps, random start), with budget ``eps`` under ``threat``; the loss is
    ``(1 − adv_weight)·CE(clean) + adv_weight·CE(adversarial)`` (0.5: Goodfellow et al. 2015's FGSM
    training; 1: adversarial batches alone, as the NRPM release). ``optimizer``: ``sgd``
    (``momentum``) or ``adam``; ``schedule``: ``constant``, ``cosine`` or ``step`` (×0.1 at half
    the epochs). ``val_n``: held-out points (the end of the training split). ``keep``: return the
    ``best`` validated epoch (the starting model counts as epoch 0) or the ``last`` one.
    """

    paradigm: int = 2
    adversarial: str | None = "fgsm"
    eps: float = 0.2
    threat: str = "Linf"
    pgd_steps: int = 7
    pgd_alpha: float | None = None  # the PGD step in pixel units; None: 2.5·ε/pgd_steps
    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    batch_size: int = 64
    seed: int = 0
    val_n: int = 1000
    n_train: int | None = None
    keep: str = "best"
    adv_weight: float = 0.5
    amp: str | None = None  # None/"none": float32; "bf16"/"fp16": autocast (NRPM estimates stay float32)
    sync_bn: bool = False  # paradigm 3 under torchrun: BatchNorm statistics over the global batch

    def __post_init__(self):
        if self.paradigm not in (2, 3):
            raise InvalidInputError(f"fine-tuning is paradigm 2 (λ only) or 3 (everything), got {self.paradigm!r}")
        if self.adversarial not in (None, "fgsm", "pgd"):
            raise InvalidInputError(f"adversarial must be None, 'fgsm' or 'pgd', got {self.adversarial!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise InvalidInputError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0.0 <= self.adv_weight <= 1.0:
            raise InvalidInputError(f"adv_weight is the adversarial share of the loss, in [0, 1]; got {self.adv_weight!r}")
        if self.keep not in ("best", "last"):
            raise InvalidInputError(f"keep must be 'best' (best validated epoch, the start included) or 'last', got {self.keep!r}")
        resolve_amp(self.amp)  # an unknown word is a clear error
        if self.schedule not in ("constant", "cosine", "step"):
            raise InvalidInputError(f"schedule must be 'constant', 'cosine' or 'step', got {self.schedule!r}")
        from robust_surgery.limits import check_count, check_seed

        check_count("epochs", self.epochs, "epochs", flag="--epochs")
        check_count("batch_size", self.batch_size, "batch_size", flag="--batch-size")
        check_count("pgd_steps", self.pgd_steps, "steps", flag="--pgd-steps")
        check_seed(self.seed)
        if isinstance(self.val_n, bool) or not isinstance(self.val_n, int) or self.val_n < 0:
            raise InvalidInputError(f"val_n (--val-n) must be a whole number >= 0, got {self.val_n!r}")
        if self.n_train is not None and (not isinstance(self.n_train, int) or self.n_train < 1):
            raise InvalidInputError(f"n_train (--n-train) must be a whole number >= 1, got {self.n_train!r}")
        for name, value in (("lr (--lr)", self.lr), ("eps (--train-eps)", self.eps), ("momentum", self.momentum),
                            ("weight_decay", self.weight_decay), ("adv_weight (--adv-weight)", self.adv_weight)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise NonFiniteError(f"{name} must be a finite number, got {value!r}")
        if self.eps < 0:
            raise InvalidInputError(f"the training attack's budget eps (--train-eps) must be >= 0, got {self.eps}")
        if not self.lr > 0 or self.momentum < 0 or self.weight_decay < 0:
            raise InvalidInputError(f"lr must be > 0 and momentum, weight_decay >= 0; got lr {self.lr}, "
                             f"momentum {self.momentum}, weight_decay {self.weight_decay}")
        if self.threat not in ("Linf", "L2"):
            raise InvalidInputError(f"threat must be Linf or L2, got {self.threat!r}")
        if self.pgd_alpha is not None and (isinstance(self.pgd_alpha, bool) or not isinstance(self.pgd_alpha, (int, float))
                                           or not math.isfinite(self.pgd_alpha) or self.pgd_alpha <= 0):
            raise InvalidInputError(f"pgd_alpha (the PGD step) must be a finite number > 0, got {self.pgd_alpha!r}")


def load_train_val(data, val_n: int, n_train: int | None, data_root=None):
    """Training and validation tensors of ``data``'s training split (any spec of
    :func:`robust_surgery.data.resolve.resolve_data`: a name, a path, ``synthetic[:...]``, a pair).

    The validation split is the last ``val_n`` points of the training split (deterministic);
    ``n_train`` keeps only the first n of the rest. Images (N, C, H, W) in [0, 1], labels (N,).
    """
    from robust_surgery.data.resolve import resolve_data

    x, y = resolve_data(data, "train", data_root=data_root).tensors
    if val_n >= len(x):
        raise InvalidInputError(f"val_n = {val_n} leaves no training points (the split has {len(x)})")
    xt, yt = x[: len(x) - val_n], y[: len(y) - val_n]
    xv, yv = x[len(x) - val_n:], y[len(y) - val_n:]
    if n_train is not None:
        xt, yt = xt[:n_train], yt[:n_train]
    check_unit_range(xt)
    return (xt, yt), (xv, yv)


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def adversarial_batch(model, target, cfg: FinetuneConfig, xb, yb, seed: int, n_classes: int):
    """Adversarial copies of the batch xb (B, ...) in [0, 1] for labels yb (B,), made against ``target``.

    The attack is ``cfg.adversarial`` (FGSM/PGD) at ``cfg.eps`` under ``cfg.threat``, seeded; the
    model is attacked in eval mode and put back in the mode it was in. Returns xb itself when
    training is clean (no attack or ε = 0).
    """
    if cfg.adversarial is None or cfg.eps == 0:
        return xb
    was = model.training
    model.eval()
    torch.manual_seed(seed)
    attack = build_attack(AttackConfig(cfg.adversarial, cfg.eps, cfg.threat, steps=cfg.pgd_steps,
                                        alpha=cfg.pgd_alpha), target, n_classes, seed)
    x_adv = attack(xb, yb).detach()
    model.train(was)
    return x_adv


def _training_loss(target, cfg: FinetuneConfig, x_clean, x_adv, y) -> torch.Tensor:
    """α·CE(clean) + (1 − α)·CE(adversarial), α = 1 − adv_weight (Goodfellow et al. 2015); CE alone when clean."""
    w = cfg.adv_weight if x_adv is not x_clean else 0.0
    if w == 0.0:
        return F.cross_entropy(target(x_clean), y)
    if w == 1.0:
        return F.cross_entropy(target(x_adv), y)
    logits = target(torch.cat([x_clean, x_adv]))
    return (1 - w) * F.cross_entropy(logits[: len(y)], y) + w * F.cross_entropy(logits[len(y):], y)


def _validate(model, target, cfg: FinetuneConfig, xv, yv, n_classes: int) -> dict:
    """Validation accuracies in percent: clean, and robust to the training attack (seeded per chunk of
    500 points). Under torchrun each rank takes every world-th chunk and the counts are summed."""
    rank, world = dist_info()
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64)  # clean, robust
    for c, i in enumerate(range(0, len(xv), 500)):
        if c % world != rank:
            continue
        xb, yb = xv[i:i + 500], yv[i:i + 500]
        counts[0] += evaluate_accuracy(target, xb, yb, batch_size=500)[0]
        if cfg.adversarial:
            x_adv = adversarial_batch(model, target, cfg, xb, yb, cfg.seed + 7919 + i, n_classes)
            with torch.no_grad():
                ok = (target(xb).argmax(1) == yb) & (target(x_adv).argmax(1) == yb)
            counts[1] += int(ok.sum())
    all_reduce_sum_(counts, world)
    out = {"val_clean_acc": 100.0 * int(counts[0]) / max(len(xv), 1)}
    if cfg.adversarial and len(xv):
        out["val_robust_acc"] = 100.0 * int(counts[1]) / len(xv)
    return out


def lr_at_epoch(cfg: FinetuneConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under ``cfg.schedule``: constant, cosine or step (÷10 halfway)."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 if epoch >= max(1, cfg.epochs // 2) else 1.0)
    return cfg.lr


def check_finetune_paths(checkpoint_dir, log) -> Path | None:
    """Refuse an unusable ``checkpoint_dir`` (a file) or ``log`` path before any work starts;
    return the checkpoint file's path (None without ``checkpoint_dir``)."""
    ckpt = Path(checkpoint_dir) / "finetune-last.pt" if checkpoint_dir is not None else None
    if ckpt is not None:
        if Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
            raise OutputPathError(f"the checkpoint folder (--checkpoint-dir) {checkpoint_dir} is a file; give a folder")
        check_output_path(ckpt, make_parents=True, what="checkpoint")
    if log is not None:
        check_output_path(log, make_parents=True, what="log file (--log)")
    return ckpt


def _record(model: nn.Module, cfg: FinetuneConfig, train, val) -> dict:
    """Everything that changes a fine-tuning run's result (see :mod:`robust_surgery.io.runrecord`):
    the starting model's manifest (architecture, paradigm, NRPM settings per layer, provenance),
    its weights, the training and validation data, and every training setting."""
    from robust_surgery.io.model_file import build_manifest

    manifest = {k: v for k, v in build_manifest(model).items() if k not in ("created", "training", "paradigm")}
    return {"version": RECORD_VERSION, "starting model": manifest, "starting weights": state_digest(model),
            "training data": tensor_digest(*train), "validation data": tensor_digest(*val),
            "settings": asdict(cfg)}


def finetune(
    model: nn.Module,
    data,
    paradigm: int = 2,
    *,
    adversarial: str | None = "fgsm",
    eps: float = 0.2,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    batch_size: int = 64,
    seed: int = 0,
    threat: str = "Linf",
    pgd_steps: int = 7,
    pgd_alpha: float | None = None,
    val_n: int = 1000,
    n_train: int | None = None,
    keep: str = "best",
    adv_weight: float = 0.5,
    amp: str | None = None,
    sync_bn: bool = False,
    checkpoint_dir: str | Path | None = None,
    log: str | Path | None = None,
    max_epochs_this_run: int | None = None,
    checkpoint_every: int | None = None,
    data_root=None,
    device=None,
    progress: bool = False,
) -> tuple[nn.Module, list[dict]]:
    """Fine-tune a converted ``model`` in place (paradigm 2: λ only; 3: everything).

    data: ``"mnist"``, ``"cifar10"``, a path, or an ``(images, labels)`` pair (the training
    split; its last ``val_n`` points are held out). Returns ``(model, history)``: the model
    holds the best epoch's weights (by validation robust accuracy when adversarial, else
    clean; the starting model counts as epoch 0, so when no epoch beats it the model comes back
    unchanged and ``training["best_epoch"]`` is 0; ``keep="last"`` returns the last epoch instead),
    history one dict per epoch (loss, lr, seconds, validation accuracies). With
    ``checkpoint_dir`` a checkpoint is written after every epoch and a rerun resumes from it;
    ``log`` receives the history as JSON after every epoch. ``max_epochs_this_run`` stops early
    (the checkpoint lets the next call continue); ``checkpoint_every``: also checkpoint every that many
steps inside an epoch (long epochs). ``amp``: ``"bf16"`` or ``"fp16"`` runs the
    model's forward passes (training, attacks, validation) under autocast; ``device``: where to
    train (``auto``, ``cpu``, ``cuda[:N]`` or a torch.device; default: where the model is); ``sync_bn``: under torchrun, paradigm 3 takes BatchNorm
    statistics over the global batch (SyncBatchNorm) instead of each rank's share.
    """
    cfg = FinetuneConfig(paradigm=paradigm, adversarial=adversarial, eps=eps, threat=threat, pgd_steps=pgd_steps,
                         pgd_alpha=pgd_alpha, epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                         schedule=schedule, batch_size=batch_size, seed=seed, val_n=val_n, n_train=n_train,
                         keep=keep, adv_weight=adv_weight, amp=amp_name(amp),
                         sync_bn=bool(sync_bn))
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"finetune takes an nn.Module, got a {type(model).__name__}; load it first "
                        "(robust_surgery.load('converted.safetensors'))")
    if not is_converted(model):
        raise InvalidInputError("finetune needs a converted model (with NRPM layers): run robust_surgery.convert first")
    ckpt = check_finetune_paths(checkpoint_dir, log)
    (xt, yt), (xv, yv) = load_train_val(data, cfg.val_n, cfg.n_train, data_root)
    dev = resolve_device(device) if device else next(model.parameters()).device
    apply_paradigm(model, cfg.paradigm)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidInputError("nothing to train: the model has no trainable parameters for this paradigm (a λ of "
                                "exactly 0 or 1 cannot move: convert with 0 < lam < 1, or use paradigm 3)")
    opt = make_optimizer(params, cfg.optimizer, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    target = AttackTarget(model, amp=resolve_amp(cfg.amp)).to(dev).eval()
    n_classes = count_classes(target, xt[:1].to(dev))
    check_labels_fit(torch.cat([yt, yv]), n_classes)

    # the run's record (digests of the start and the data, every setting) matters only to a checkpoint
    record = _record(model, cfg, (xt, yt), (xv, yv)) if ckpt else None
    xv, yv = xv.to(dev), yv.to(dev)
    resume = (resume_file(ckpt, record, "checkpoint", "delete it or use another --checkpoint-dir")
              if ckpt and ckpt.exists() else None)

    def step(xb, yb, epoch, s):
        x_adv = adversarial_batch(model, target, cfg, xb, yb, batch_seed(cfg.seed, epoch, s), n_classes)
        model.train()
        if cfg.paradigm == 2:
            _freeze_batchnorm(model)
        return BatchLoss(_training_loss(target, cfg, xb, x_adv, yb))

    def end_epoch(epoch):
        return {**_validate(model, target, cfg, xv, yv, n_classes),
                "lam": {name: m.lam_value for name, m in nrpm_layers(model)}}

    # paradigm 2 keeps BatchNorm frozen (eval mode): nothing to synchronise
    with synchronized_batchnorm(model, cfg.sync_bn and cfg.paradigm == 3):
        result = train_loop(
            model, opt, xt, yt, step, epochs=cfg.epochs, batch_size=cfg.batch_size,
            order=lambda epoch: epoch_permutation(len(xt), cfg.seed, epoch), lr_at=lambda epoch: lr_at_epoch(cfg, epoch),
            end_epoch=end_epoch, score=lambda row: row.get("val_robust_acc", row["val_clean_acc"]),
            start_row=lambda: _validate(model, target, cfg, xv, yv, n_classes), keep_best=cfg.keep == "best",
            checkpoint=ckpt, record=pack_record(record) if ckpt else None, resume=resume, log=Path(log) if log else None,
            max_epochs_this_run=max_epochs_this_run, checkpoint_every=checkpoint_every, device=dev, progress=progress)
    history, best = result.history, {"epoch": result.best_epoch, "start": result.start}
    model.eval()
    kept = best["epoch"] if cfg.keep == "best" else len(history)
    set_meta(model, training={**asdict(cfg), "best_epoch": best["epoch"], "kept_epoch": kept, "start": best.get("start"),
                              "history": history})
    return model, history
