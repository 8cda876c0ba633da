"""Black-box access to a source model: probability vectors out, queries counted, no gradients.

BAR must never differentiate through the source (the public BAR release computes a zeroth-order
estimate and then steps with the true gradient). :class:`QueryOracle` enforces this by design:
the model is only ever run under ``torch.no_grad()``, and what comes back is a fresh tensor of
probabilities that carries no autograd history, so no backward pass can reach the source.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_surgery._device import autocast, resolve_amp
from robust_surgery.errors import InvalidInputError, UserError

__all__ = ["QueryOracle", "QueryBudgetExceeded"]


class QueryBudgetExceeded(UserError, RuntimeError):
    """A query would go past the oracle's budget; nothing was sent."""


class QueryOracle:
    """``oracle(x)``: ``(B, C, H, W)`` source inputs → ``(B, n_classes)`` softmax probabilities.

    Every input counts as one query (``queries``); ``budget`` (None: unlimited) refuses a call
    that would exceed it (:class:`QueryBudgetExceeded`, before anything runs). Large calls are
    sent in chunks of ``max_batch``. ``price_per_1000``: the price of 1000 queries (the BAR
    paper's unit), for :meth:`cost`. The model runs where its parameters are (inputs are moved there,
probabilities come back on the inputs' device, float32), under autocast when ``amp`` is
``bf16``/``fp16``.
    """

    def __init__(self, model: nn.Module, *, budget: int | None = None, max_batch: int = 512,
                 price_per_1000: float = 1.0, amp: str | torch.dtype | None = None):
        if budget is not None and budget < 1:
            raise InvalidInputError(f"a query budget must be a positive number of queries, got {budget}")
        for p in model.parameters():
            p.requires_grad_(False)
        self._model = model.eval()  # private: callers get probabilities, never the module
        self.budget = budget
        self.max_batch = int(max_batch)
        self.price_per_1000 = float(price_per_1000)
        self.queries = 0
        self._amp = resolve_amp(amp)  # autocast of the model's forward passes (None: float32)

    def remaining(self) -> int | None:
        """Queries left under the budget (None when unlimited)."""
        return None if self.budget is None else self.budget - self.queries

    def cost(self, queries: int | None = None) -> float:
        """Price of ``queries`` (default: those used so far) at ``price_per_1000``."""
        return (self.queries if queries is None else queries) * self.price_per_1000 / 1000.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(B, n_classes)`` of inputs ``(B, C, H, W)``; detached, counted."""
        n = len(x)
        if self.budget is not None and self.queries + n > self.budget:
            raise QueryBudgetExceeded(f"{n} more queries would exceed the budget of {self.budget} "
                                      f"({self.queries} used); raise the budget or take fewer/smaller steps")
        out = []
        device = next(self._model.parameters(), x).device
        with torch.no_grad(), autocast(device, self._amp):
            for i in range(0, n, self.max_batch):
                logits = self._model(x[i:i + self.max_batch].detach().to(device)).float()
                out.append(torch.softmax(logits, dim=-1).to(x.device))
        self.queries += n
        return torch.cat(out).detach().clone()
