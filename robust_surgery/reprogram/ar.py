"""AR: white-box adversarial reprogramming (Elsayed, Goodfellow, Sohl-Dickstein, ICLR 2019).

Only the program W trains (and, with the learned ``linear`` mapping, its output layer), with the
source's true gradients: loss −log h_y(F(X̃)) + λ‖W‖², Adam, learning rate × ``decay`` every
``decay_every`` epochs. The source is frozen; training
checks that its weights are bit-identical afterwards and raises otherwise.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from robust_surgery.evaluation.attacks import check_unit_range
from robust_surgery._device import amp_name, autocast, resolve_device
from robust_surgery._loops import evaluate_accuracy
from robust_surgery.training.loop import BatchLoss, make_optimizer, train_loop
from robust_surgery.reprogram.losses import mapped_nll
from robust_surgery.reprogram.pipeline import (ReprogrammedModel, choose_mapping, freeze_source, remap_iteratively,
                                               source_canvas, source_classes, state_digest)
from robust_surgery.reprogram.program import CanvasSpec, Program
from robust_surgery.errors import InvalidInputError

__all__ = ["ARConfig", "train_ar", "reprogram_ar"]


@dataclass(frozen=True)
class ARConfig:
    """AR settings: ``reg`` is λ of λ‖W‖²; the learning rate is multiplied by ``decay`` every
    ``decay_every`` epochs (the paper: 0.96 every 2). ``adv_eps`` > 0 trains the program
    adversarially (robust reprogramming): each batch is replaced by its PGD-``adv_steps`` copy at
    L∞ budget ``adv_eps`` on the [0, 1] target input, made against the whole pipeline.
    ``mapping_lr``: the learning rate of a learned (``linear``) mapping's A and b, decayed with
    the program's."""

    epochs: int = 2
    lr: float = 0.05
    reg: float = 1e-6
    batch_size: int = 128
    decay: float = 0.96
    decay_every: int = 2
    seed: int = 0
    adv_eps: float = 0.0
    adv_steps: int = 7
    mapping_lr: float = 0.01

    def __post_init__(self):
        from robust_surgery.limits import check_count

        check_count("epochs", self.epochs, "epochs", flag="--epochs")
        check_count("batch_size", self.batch_size, "batch_size", flag="--batch-size")
        check_count("adv_steps", self.adv_steps, "steps", flag="--adv-steps")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.reg < 0 or not 0 < self.decay <= 1 \
                or self.decay_every < 1 or not self.mapping_lr > 0:
            raise InvalidInputError("AR needs epochs >= 1, batch_size >= 1, lr > 0, reg >= 0, 0 < decay <= 1, decay_every >= 1, "
                                    "mapping_lr > 0")
        if not 0 <= self.adv_eps <= 1 or self.adv_steps < 1:
            raise InvalidInputError(f"adversarial program training needs 0 <= adv_eps <= 1 (L∞ on [0, 1] inputs) and "
                                    f"adv_steps >= 1, got adv_eps={self.adv_eps}, adv_steps={self.adv_steps}")


class SourceChangedError(RuntimeError):
    """The frozen source's weights changed during reprogramming (a bug: only the program may train)."""


def train_ar(model: ReprogrammedModel, x: torch.Tensor, y: torch.Tensor, cfg: ARConfig = ARConfig(), *,
             val: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = False,
             amp: str | torch.dtype | None = None, remap: Callable[[], bool] | None = None) -> list[dict]:
    """Train the program of ``model`` on target data ``x`` ``(N, c, h, w)`` in [0, 1], ``y`` ``(N,)``,
    on the device of the program's weights; ``amp`` (``bf16``/``fp16``) runs the source under autocast
    (the mapped probabilities and the loss stay float32). ``remap`` (iterative label mapping) is
    called after every epoch but the last and re-solves the mapping for the next one; the epoch's
    record says whether it changed (``mapping_changed``).

    Returns one record per epoch (mean loss, train accuracy of the batches, optional validation
    accuracy in %, lr, seconds). Raises :class:`SourceChangedError` if the source moved.
    """
    check_unit_range(x)
    if len(x) != len(y) or len(x) == 0:
        raise InvalidInputError(f"need as many labels as target inputs (got {len(x)} inputs, {len(y)} labels)")
    if int(y.max()) >= model.mapping.n_target:
        raise InvalidInputError(f"labels go up to {int(y.max())} but the mapping has {model.mapping.n_target} target classes")
    freeze_source(model.source)
    before = state_digest(model.source)
    w = model.program.weight
    groups = [{"params": [w]}]
    learned = [p for p in model.mapping.parameters() if p.requires_grad]
    if learned:  # a linear mapping trains beside W at its own rate (train_loop scales it by lr_scale)
        groups.append({"params": learned, "lr": cfg.mapping_lr, "lr_scale": cfg.mapping_lr / cfg.lr})
    opt = make_optimizer(groups, "adam", cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)

    def lr_at(epoch):  # StepLR's chained form: × decay every decay_every epochs
        lr = cfg.lr
        for _ in range(epoch // cfg.decay_every):
            lr *= cfg.decay
        return lr

    def step(xb, yb, epoch, s):
        if cfg.adv_eps > 0:  # robust reprogramming: learn W on the pipeline's own PGD examples
            xb = _pgd_batch(model, xb, yb, cfg, seed=cfg.seed * 1_000_003 + epoch * 10_007 + s)
        model.train()
        with autocast(w.device, amp):
            h = model.mapped_probs(xb).float()
        return BatchLoss(mapped_nll(h, yb) + cfg.reg * w.pow(2).sum(), {"correct": int((h.argmax(1) == yb).sum())})

    def end_epoch(epoch):
        row = {} if val is None else {"val_acc": 100.0 * evaluate_accuracy(model, val[0], val[1], batch_size=500, amp=amp)[0] / len(val[0])}
        if remap is not None and epoch < cfg.epochs - 1:
            model.eval()
            row["mapping_changed"] = bool(remap())
        return row

    history = train_loop(model, opt, x, y, step, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         order=lambda epoch: torch.randperm(len(x), generator=g), lr_at=lr_at, end_epoch=end_epoch,
                         device=w.device, progress=progress, label="AR epoch", loss_name="loss").history
    for row in history:
        row["train_acc"] = 100.0 * row.pop("correct") / len(x)
    model.eval()
    if state_digest(model.source) != before:
        raise SourceChangedError("the source model's weights changed while reprogramming; only W may train")
    return history


def _pgd_batch(model: ReprogrammedModel, xb: torch.Tensor, yb: torch.Tensor, cfg: ARConfig, seed: int) -> torch.Tensor:
    """PGD copies (L∞ ``cfg.adv_eps``, ``cfg.adv_steps`` steps) of the target batch against the pipeline."""
    from robust_surgery.evaluation.attacks import AttackConfig, build_attack

    model.eval()
    torch.manual_seed(seed)
    attack = build_attack(AttackConfig("pgd", cfg.adv_eps, steps=cfg.adv_steps), model, model.mapping.n_target, seed)
    return attack(xb, yb).detach()


def reprogram_ar(source: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ARConfig = ARConfig(), *,
                 n_target: int | None = None, canvas: Sequence[int] | None = None, data_size: int = 16,
                 low_dim: int | None = None, mapping: str = "one-to-one", m: int = 1, cover_data: bool = False,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = False,
                 device: str | torch.device | None = "auto", amp: str | torch.dtype | None = None
                 ) -> tuple[ReprogrammedModel, dict]:
    """Build the AR pipeline around a frozen ``source`` and train it on ``(x, y)``.

    ``device`` (``auto``, ``cpu``, ``cuda[:N]``; None: where the source is): where the source
    and the program run; ``amp``: autocast of the source's forward passes (``bf16``/``fp16``).

    ``canvas``: the source's input shape (default: the zoo entry's); ``data_size``: the side of
    the embedded target input; ``mapping``: ``one-to-one``, ``random``, ``frequency``, ``ilm``
    (frequency, re-solved from the current program after every epoch) with ``m``
    source labels per class, or ``linear`` (a learned output layer on the source log-probabilities,
    trained with W at ``cfg.mapping_lr``); ``cover_data``: the program also adds a bounded pattern to the data
    region (:class:`~.program.Program`). Returns the model and a report (settings, history, seconds).
    """
    t0 = time.time()
    canvas = tuple(canvas) if canvas else source_canvas(source)
    n_target = n_target or int(y.max()) + 1
    freeze_source(source)
    if device is not None:
        source.to(resolve_device(device))
    n_source = source_classes(source, canvas)
    program = Program(CanvasSpec(canvas, data_size, x.shape[1]), low_dim, cover_data)
    dev = next(source.parameters()).device
    probs = lambda z: torch.softmax(source(z.to(dev)), dim=-1).to(z.device)  # noqa: E731  (white-box: the source)
    table = choose_mapping(mapping, y, n_target, n_source, m, seed=cfg.seed, probs_fn=probs, program=program, x=x)
    model = ReprogrammedModel(source, program.to(dev), table)
    remap = None
    if mapping == "ilm":  # the program now runs where the source is: its inputs go there once
        x_dev = x.to(dev)

        def remap():
            return remap_iteratively(model.mapping, probs, model.program, x_dev, y)
    history = train_ar(model, x, y, cfg, val=val, progress=progress, amp=amp, remap=remap)
    report = {"method": "ar", "config": asdict(cfg), "mapping": mapping, "m": m, "data_size": data_size,
              "device": str(next(source.parameters()).device), "amp": amp_name(amp),
              "low_dim": low_dim, "cover_data": cover_data, "d": program.d, "n_train": len(x), "history": history,
              "seconds": round(time.time() - t0, 2)}
    return model, report
