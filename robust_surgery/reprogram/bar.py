"""BAR: black-box adversarial reprogramming (Tsai, Chen, Ho, ICML 2020).

The source is reachable only through a :class:`~.query.QueryOracle` (probabilities out,
queries counted, no gradients by construction). Each step estimates the gradient of the focal
loss with respect to W by zeroth-order differences along q random unit directions
(:func:`~.zo.zo_gradient`, b = d) and gives that estimate to Adam; the learning rate is
multiplied by ``decay`` every ``decay_every`` steps. A step costs batch × (q + 1) queries; the
frequency mapping costs one query per target training input. Nothing here calls ``backward``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from robust_surgery.evaluation.attacks import check_unit_range
from robust_surgery._device import amp_name, resolve_device
from robust_surgery._loops import training_progress
from robust_surgery.reprogram.losses import class_balance_weights, focal_loss
from robust_surgery.reprogram.mapping import LabelMapping
from robust_surgery.reprogram.pipeline import (ReprogrammedModel, choose_mapping, freeze_source, remap_iteratively,
                                               source_canvas)
from robust_surgery.reprogram.program import CanvasSpec, Program
from robust_surgery.reprogram.query import QueryOracle
from robust_surgery.reprogram.zo import zo_gradient
from robust_surgery.errors import InvalidInputError

__all__ = ["BARConfig", "train_bar", "reprogram_bar"]


@dataclass(frozen=True)
class BARConfig:
    """BAR settings. ``q`` directions per estimate, smoothing radius ``beta``; focal loss ``gamma``
    with class-balance weights ω_j ∝ 1/n_j when ``class_balance``; ``budget``: the most queries
    to spend in all (mapping included; None: unlimited); ``price_per_1000``: for the cost report."""

    steps: int = 200
    q: int = 20
    beta: float = 0.05
    lr: float = 0.05
    batch_size: int = 32
    gamma: float = 2.0
    class_balance: bool = True
    decay: float = 0.96
    decay_every: int = 50
    seed: int = 0
    budget: int | None = None
    price_per_1000: float = 1.0

    def __post_init__(self):
        from robust_surgery.limits import check_count

        check_count("steps", self.steps, "zo_steps", flag="--steps")
        check_count("q (random directions per estimate)", self.q, "directions", flag="--q")
        check_count("batch_size", self.batch_size, "batch_size", flag="--batch-size")
        if self.steps < 1 or self.q < 1 or not self.beta > 0 or not self.lr > 0 or self.batch_size < 1 \
                or self.gamma < 0 or not 0 < self.decay <= 1 or self.decay_every < 1:
            raise InvalidInputError("BAR needs steps >= 1, q >= 1, β > 0, lr > 0, batch_size >= 1, γ >= 0, "
                             "0 < decay <= 1, decay_every >= 1")
        if self.budget is not None and self.budget < self.batch_size * (self.q + 1):
            raise InvalidInputError(f"a query budget of {self.budget} does not cover one step "
                             f"(batch {self.batch_size} × (q + 1) = {self.batch_size * (self.q + 1)} queries)")


def train_bar(program: Program, mapping: LabelMapping, oracle: QueryOracle, x: torch.Tensor, y: torch.Tensor,
              cfg: BARConfig = BARConfig(), *, progress: bool = False, remap_every: int | None = None,
              log_every: int | None = None, on_log: Callable[[dict], dict] | None = None) -> dict:
    """Train ``program.weight`` by zeroth-order steps through ``oracle`` on ``(x, y)``.

    ``x`` ``(N, c, h, w)`` in [0, 1], ``y`` ``(N,)``. Stops after ``cfg.steps`` steps or when the
    next step would pass the oracle's budget. Returns ``{"steps", "queries", "history"}`` (one
    record per 10 % of the steps: mean loss and batch accuracy since the last record, queries).
    ``remap_every``: iterative label mapping — every that many steps the mapping is re-solved from
    the current program's predictions on all of ``x`` (len(x) queries, counted; skipped when the
    budget cannot pay for it and a step); ``remaps`` in the result counts the changes.
    ``log_every`` (default: 10 % of the steps) sets the history's spacing; ``on_log(record)`` may add
    fields to each record (a held-out accuracy for an accuracy-vs-queries curve, say).
    """
    check_unit_range(x)
    if len(x) != len(y) or len(x) == 0:
        raise InvalidInputError(f"need as many labels as target inputs (got {len(x)} inputs, {len(y)} labels)")
    weights = class_balance_weights(y, mapping.n_target) if cfg.class_balance else None
    w = program.weight
    opt = torch.optim.Adam([w], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.decay_every, gamma=cfg.decay)
    g = torch.Generator().manual_seed(cfg.seed)
    per_step = min(cfg.batch_size, len(x)) * (cfg.q + 1)
    log_every = log_every or max(1, cfg.steps // 10)
    history, losses, hits, seen = [], [], 0, 0
    done, remaps = 0, 0
    last: dict = {}

    def f(ws: torch.Tensor) -> torch.Tensor:  # (k, *W) -> (k,) focal losses, through the oracle only
        xs = program.batched(xb, ws)
        h = mapping(oracle(xs.flatten(0, 1)).view(len(ws), len(xb), -1))
        if len(ws) == 1:
            last["h"] = h[0]
        return focal_loss(h, yb, cfg.gamma, weights)

    with torch.no_grad(), training_progress(progress) as bar:
        task = bar.add_task("BAR steps", total=cfg.steps, loss=float("nan"))
        for step in range(cfg.steps):
            if oracle.remaining() is not None and oracle.remaining() < per_step:
                break
            idx = torch.randint(len(x), (min(cfg.batch_size, len(x)),), generator=g)
            xb, yb = x[idx], y[idx]
            grad, loss = zo_gradient(f, w, cfg.q, cfg.beta, g)
            w.grad = grad
            opt.step()
            sched.step()
            done += 1
            losses.append(float(loss))
            hits += int((last["h"].argmax(1) == yb).sum())
            seen += len(yb)
            bar.update(task, advance=1, loss=float(loss))
            if remap_every and done % remap_every == 0 and done < cfg.steps and \
                    (oracle.remaining() is None or oracle.remaining() >= len(x) + per_step):
                remaps += int(remap_iteratively(mapping, oracle, program, x, y))
            if done % log_every == 0:
                record = {"step": done, "loss": sum(losses) / len(losses), "batch_acc": 100.0 * hits / seen,
                          "queries": oracle.queries, "lr": opt.param_groups[0]["lr"]}
                history.append({**record, **(on_log(record) if on_log else {})})
                losses, hits, seen = [], 0, 0
    w.grad = None
    return {"steps": done, "queries": oracle.queries, "history": history, "remaps": remaps}


def reprogram_bar(source: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: BARConfig = BARConfig(), *,
                  n_target: int | None = None, canvas: Sequence[int] | None = None, data_size: int = 16,
                  low_dim: int | None = 8, mapping: str = "frequency", m: int = 1, cover_data: bool = False,
                  progress: bool = False, device: str | torch.device | None = "auto",
                  amp: str | torch.dtype | None = None
                  ) -> tuple[ReprogrammedModel, dict]:
    """BAR around ``source``: the source is wrapped in a :class:`QueryOracle` for all of training.

    ``low_dim``: side r of the coarse program (W is ``(C, r, r)``, upsampled; None: full size).
    ``mapping``: ``ilm`` (frequency, re-solved from the current program once per pass over the
    training data: len(x) queries each time), ``frequency`` (from the source labels of the target training data under the
    initial program; its queries count), ``random`` or ``one-to-one``, ``m`` labels per class
    (not ``linear``: it needs gradients);
    ``cover_data``: the program also adds a bounded pattern to the data region.
    Returns the pipeline (holding the source, for evaluation) and a report with the queries
    used and their cost at ``cfg.price_per_1000``. ``device``/``amp``: where and in what precision the
    source answers queries (None: where it is); the program is optimised on the CPU.
    """
    t0 = time.time()
    if mapping == "linear":
        raise InvalidInputError("BAR cannot train the linear mapping (it learns from gradients, BAR has only queries): "
                                "choose --mapping frequency, ilm, random or one-to-one")
    canvas = tuple(canvas) if canvas else source_canvas(source)
    n_target = n_target or int(y.max()) + 1
    freeze_source(source)
    if device is not None:
        source.to(resolve_device(device))
    oracle = QueryOracle(source, budget=cfg.budget, price_per_1000=cfg.price_per_1000, amp=amp)
    program = Program(CanvasSpec(canvas, data_size, x.shape[1]), low_dim, cover_data)
    n_source = oracle(program(x[:1])).shape[-1]
    table = choose_mapping(mapping, y, n_target, n_source, m, seed=cfg.seed, probs_fn=oracle, program=program, x=x)
    mapping_queries = oracle.queries
    passes = max(1, -(-len(x) // cfg.batch_size))  # steps per pass over the training data
    result = train_bar(program, table, oracle, x, y, cfg, progress=progress,
                       remap_every=passes if mapping == "ilm" else None)
    model = ReprogrammedModel(source, program.to(next(source.parameters()).device), table)  # evaluated as one net
    report = {"method": "bar", "config": asdict(cfg), "mapping": mapping, "m": m, "data_size": data_size,
              "device": str(next(source.parameters()).device), "amp": amp_name(amp),
              "low_dim": low_dim, "cover_data": cover_data, "d": program.d, "n_train": len(x), "steps": result["steps"],
              "queries": oracle.queries, "mapping_queries": mapping_queries, "remaps": result["remaps"],
              "queries_per_step": cfg.batch_size * (cfg.q + 1),
              "cost": oracle.cost(), "price_per_1000": cfg.price_per_1000,
              "history": result["history"], "seconds": round(time.time() - t0, 2)}
    return model, report
