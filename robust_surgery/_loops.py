"""Building blocks shared by the training and evaluation loops: progress bars, batched accuracy."""
from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

from robust_surgery._device import autocast

__all__ = ["check_finite_loss", "evaluate_accuracy", "training_progress", "work_progress"]


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 1000, device: str | torch.device | None = None,
                      amp: str | torch.dtype | None = None) -> tuple[int, int]:
    """(number correct, number of points) of ``model`` (in eval mode) on images N x C x H x W, labels N;
    ``amp`` (``bf16``/``fp16``) runs the forward passes under autocast."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        xb = images[i:i + batch_size].to(device)
        yb = labels[i:i + batch_size].to(device)
        with autocast(device, amp):
            correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    return correct, len(images)


class _NoProgress:
    """What a disabled progress bar is: nothing drawn, rich not imported (machines without it run too)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        pass


class PlainProgress:
    """Progress for logs. When stderr is not a terminal (a batch job, ``nohup``, a CI log) rich's live
    bars draw nothing; this prints one plain line per task every ``interval`` seconds and when the
    task completes: ``R2DL epoch 1/2: 120/400 (30 %), 3.2 it/s, 1m27s left, loss 0.4123``.
    Same calls as rich's ``Progress`` as used here (``add_task``, ``update``, ``advance``)."""

    def __init__(self, interval: float | None = None, stream=None):
        self.interval = float(os.environ.get("ROBUST_SURGERY_PROGRESS_INTERVAL", "5")) if interval is None else interval
        self.stream = stream or sys.stderr
        self.tasks: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        now = time.monotonic()
        self.tasks.append({"description": description, "total": total, "done": completed, "base": completed,
                           "fields": fields, "start": now, "printed": now, "finished": False})
        return len(self.tasks) - 1

    def update(self, task: int, advance: float = 0, description: str | None = None, **fields) -> None:
        t = self.tasks[task]
        t["done"] += advance
        if description is not None:
            t["description"] = description
        t["fields"].update(fields)
        now = time.monotonic()
        complete = t["total"] is not None and t["done"] >= t["total"]
        if (complete and not t["finished"]) or now - t["printed"] >= self.interval:
            t["printed"], t["finished"] = now, complete
            print(self.line(t, now), file=self.stream, flush=True)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    @staticmethod
    def line(t: dict, now: float) -> str:
        """One progress line: description, done/total (percent), rate, time left or taken, fields."""
        done, total, spent = t["done"], t["total"], max(now - t["start"], 1e-9)
        rate = (done - t.get("base", 0)) / spent  # what this process did (a resumed task starts part done)
        parts = [f"{t['description']}: {done:g}" + (f"/{total:g} ({100.0 * done / total:.0f} %)" if total else "")]
        parts.append(f"{rate:.3g} it/s")
        if isinstance(t["fields"].get("left"), str) and t["fields"]["left"]:
            parts.append(t["fields"]["left"])  # the caller's own estimate
        elif total and done < total and rate > 0:
            parts.append(f"{_duration((total - done) / rate)} left")
        else:
            parts.append(f"{_duration(spent)} taken")
        loss = t["fields"].get("loss")
        if isinstance(loss, float) and loss == loss:
            parts.append(f"loss {loss:.4f}")
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def training_progress(enabled: bool):
    """A rich progress bar on stderr for epochs of steps, showing the last loss (task field ``loss``);
    plain lines (:class:`PlainProgress`) when stderr is not a terminal."""
    if not enabled:
        return _NoProgress()
    if not _stderr_is_terminal():
        return PlainProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def work_progress(enabled: bool):
    """A transient rich progress bar on stderr for units of work (batches × attacks) with the caller's
    own estimate of the time left (task field ``left``, a string); plain lines (:class:`PlainProgress`)
    when stderr is not a terminal."""
    if not enabled:
        return _NoProgress()
    if not _stderr_is_terminal():
        return PlainProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[left]}"), console=Console(stderr=True), disable=not enabled,
                    transient=True)


def check_finite_loss(loss: torch.Tensor, epoch: int, step: int, lr: float) -> None:
    """Stop a training loop with a clear error when the loss became NaN or infinite (nothing is saved)."""
    if not torch.isfinite(loss):
        from robust_surgery.errors import NonFiniteError

        raise NonFiniteError(f"training diverged: the loss is {float(loss.detach())} at epoch {epoch + 1}, step {step + 1}; "
                             f"nothing was saved. Lower --lr (now {lr:g}) or check the data")


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training points in ``epoch`` (0-based): seeded by (seed, epoch) alone,
    so a resumed run visits the points exactly as an uninterrupted one."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the attack that makes step ``step`` of ``epoch``'s adversarial batch."""
    return seed * 7_919 + epoch * 100_003 + step
