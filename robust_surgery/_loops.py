"""Building blocks shared by the training and evaluation loops: progress bars, batched accuracy."""
from __future__ import annotations

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


def training_progress(enabled: bool):
    """A rich progress bar on stderr for epochs of steps, showing the last loss (task field ``loss``)."""
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def work_progress(enabled: bool):
    """A transient rich progress bar on stderr for units of work (batches × attacks)."""
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=True)


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
