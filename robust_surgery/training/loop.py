"""The one training loop: epochs of shuffled mini-batches, a schedule, best-epoch selection,
per-epoch checkpoints that a rerun resumes from, and a JSON log.

Every trainer of the library is a configuration of :func:`train_loop`: fine-tuning (paradigms 2
and 3, :mod:`robust_surgery.training.finetune`), pretraining (:mod:`robust_surgery.training.pretrain`),
the zoo recipes (``model_zoo/train.py``) and adversarial reprogramming (:mod:`robust_surgery.reprogram.ar`).
What differs between them is passed in: how a batch becomes a loss (clean, adversarial, mapped
labels), the visiting order of the points, the learning rate per epoch and what a validation
adds to an epoch's row. Everything else (the step, the finite-loss check, the progress bar, the
checkpoint and log files, which epoch's weights come back) lives here once.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from robust_surgery._dist import all_reduce_sum_, average_gradients_, dist_info, shard
from robust_surgery._files import atomic_path
from robust_surgery._json import strict_dumps
from robust_surgery._loops import check_finite_loss, training_progress

__all__ = ["BatchLoss", "LoopResult", "train_loop", "make_optimizer"]


@dataclass
class BatchLoss:
    """What one step returns: the loss to minimise (a scalar tensor) and optional extra numbers
    summed over the epoch (e.g. ``{"correct": 57}``)."""

    loss: torch.Tensor
    sums: Optional[Mapping[str, float]] = None


@dataclass
class LoopResult:
    """The epochs' rows and the best epoch (0 = the starting model; None when not selecting)."""

    history: list[dict]
    best_epoch: Optional[int]
    start: Optional[dict]


def make_optimizer(params, name: str, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0):
    """``"sgd"`` (with ``momentum``) or ``"adam"`` over ``params``; weight decay as torch applies it."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    step: Callable[[torch.Tensor, torch.Tensor, int, int], BatchLoss],
    *,
    epochs: int,
    batch_size: int,
    order: Callable[[int], torch.Tensor],
    lr_at: Optional[Callable[[int], float]] = None,
    end_epoch: Optional[Callable[[int], dict]] = None,
    score: Optional[Callable[[dict], float]] = None,
    start_row: Optional[Callable[[], dict]] = None,
    keep_best: bool = True,
    checkpoint: Optional[Path] = None,
    record: Optional[str] = None,
    resume: Optional[dict] = None,
    log: Optional[Path] = None,
    max_epochs_this_run: Optional[int] = None,
    checkpoint_every: Optional[int] = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    label: str = "epoch",
    loss_name: str = "train_loss",
) -> LoopResult:
    """Train ``model`` in place on ``x`` (N, ...) and ``y`` (N,) for ``epochs`` epochs.

    ``step(xb, yb, epoch, s)`` turns batch ``s`` of ``epoch`` (0-based; already on ``device``) into a
    :class:`BatchLoss` and leaves the model in the mode it should train in; the loop does
    ``zero_grad → backward → optimizer.step``, stops with a clear error on a NaN/inf loss and
    records ``loss_name`` (the mean loss per point) and the epoch's summed extras. ``order(epoch)``
    is the permutation of the N points; ``lr_at(epoch)`` sets the learning rate before the epoch
    (times a parameter group's ``lr_scale`` where it has one).
    ``end_epoch(epoch)`` returns the validation numbers added to the epoch's row.

    Best-epoch selection (``score`` given): ``start_row()`` scores the starting model as epoch 0 and
    the weights of the best-scoring epoch come back (``keep_best``; ties keep the earlier epoch), so
    training never returns a model that validates worse than the one it started from.
    ``checkpoint``: after every epoch the model, optimizer, history and best weights are written
    there (atomically) with ``record`` (the run's fingerprint); ``resume`` is such a checkpoint,
    already read and checked by the caller, to continue from. ``log``: the history as JSON after
    every epoch. ``max_epochs_this_run`` stops early (a rerun continues from the checkpoint).
``checkpoint_every``: also write the checkpoint every that many steps inside an epoch, so a stopped
run of long epochs loses at most that many steps; a rerun continues at the next step of the same
epoch with the same result (the visiting order and the steps' seeds depend only on epoch and step).

    Under torchrun (a process group of W ranks): every rank holds the whole model and data and visits
    the same global batches; rank r steps on its contiguous share of each batch, its loss scaled by
    share·W / batch, and the gradients are averaged over the ranks before the optimizer step (what
    DistributedDataParallel does), so a step equals the single-process step on the whole batch up
    to rounding (BatchNorm in training mode sees only the share; attacks with a random start draw
    per share). The loss and the extras are summed over ranks; only rank 0 writes the checkpoint
    and the log; ``end_epoch`` runs on every rank (it may shard its own work, see finetune).
    """
    rank, world = dist_info()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history: list[dict] = []
    best = {"score": -math.inf, "state": None, "epoch": None, "start": None}
    start, partial = 0, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        history, best, start = resume["history"], resume["best"], resume["epoch"]
        partial = resume.get("partial")  # a checkpoint written inside epoch `start` (0-based)
    elif score is not None:
        first = start_row() if start_row is not None else {}
        best = {"score": score(first), "epoch": 0, "start": first, "state": _snapshot(model)}
    n, bs = len(x), batch_size
    steps = math.ceil(n / bs)
    stop = epochs if max_epochs_this_run is None else min(epochs, start + max_epochs_this_run)

    def save(epoch_done: int, partial_state: Optional[dict]) -> None:
        if checkpoint is not None and rank == 0:
            with atomic_path(checkpoint, make_parents=True) as tmp:
                torch.save({"record": record, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "history": history, "best": best, "epoch": epoch_done, "partial": partial_state}, tmp)

    with training_progress(progress) as bar:
        for epoch in range(start, stop):
            t0 = time.time()
            first, total, sums = 0, 0.0, {}
            if partial is not None and epoch == start:  # continue inside the epoch the checkpoint stopped in
                first, total, sums = partial["step"], partial["total"], dict(partial["sums"])
                t0 -= partial["seconds"]
            lr_now = lr_at(epoch) if lr_at is not None else optimizer.param_groups[0]["lr"]
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_now * group.get("lr_scale", 1.0)
            perm = order(epoch)
            task = bar.add_task(f"{label} {epoch + 1}/{epochs}", total=steps, completed=first, loss=float("nan"))
            for s in range(first, steps):
                idx = perm[s * bs:(s + 1) * bs]
                mine = shard(idx, rank, world)
                if len(mine) == 0:  # a last batch smaller than the world: this rank adds nothing
                    out = BatchLoss(sum(p.sum() * 0.0 for p in params if p.requires_grad))
                else:
                    out = step(x[mine].to(device), y[mine].to(device), epoch, s)
                if world == 1:
                    check_finite_loss(out.loss, epoch, s, optimizer.param_groups[0]["lr"])
                    optimizer.zero_grad(set_to_none=True)
                    out.loss.backward()
                    value = float(out.loss.detach())
                else:  # this rank's share of the batch mean; gradients and loss summed over the ranks
                    optimizer.zero_grad(set_to_none=True)
                    (out.loss * (len(mine) * world / len(idx))).backward()
                    summed = average_gradients_(params, world, out.loss.detach().reshape(1) * len(mine))
                    value = float(summed) / len(idx)
                    check_finite_loss(torch.tensor(value), epoch, s, optimizer.param_groups[0]["lr"])
                optimizer.step()
                total += value * len(idx)
                for k, v in (out.sums or {}).items():
                    sums[k] = sums.get(k, 0) + v
                bar.update(task, advance=1, loss=value)
                if checkpoint_every and (s + 1) % checkpoint_every == 0 and s + 1 < steps:
                    save(epoch, {"step": s + 1, "total": total, "sums": sums, "seconds": time.time() - t0})
            if world > 1 and sums:
                keys = sorted(sums)
                summed = all_reduce_sum_(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64), world)
                sums = {k: (int(v) if isinstance(sums[k], int) else float(v)) for k, v in zip(keys, summed.tolist())}
            row = {"epoch": epoch + 1, "lr": lr_now, loss_name: total / n, **sums}
            if end_epoch is not None:
                row.update(end_epoch(epoch))
            row["seconds"] = time.time() - t0
            history.append(row)
            if score is not None and score(row) > best["score"]:
                best = {**best, "score": score(row), "epoch": epoch + 1, "state": _snapshot(model)}
            save(epoch + 1, None)
            if log is not None and rank == 0:
                with atomic_path(log, make_parents=True) as tmp:
                    tmp.write_text(strict_dumps(history, indent=2))
    if score is not None and keep_best and len(history) == epochs and best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return LoopResult(history, best["epoch"], best.get("start"))
