"""Robustness-inheritance probe: does a clean linear head on a frozen encoder inherit robustness?

Freeze a pretrained encoder (the model up to one of its modules), train a clean linear head on a
downstream task (another label function of the synthetic task; a relabelling of the classes or
another data set on real data), then measure the clean and PGD accuracy of encoder + head with
:func:`robust_surgery.evaluate.evaluate`. :func:`compare_encoders` puts several encoders (clean,
adversarially pretrained, NRPM-converted, random) in one table.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.purification.diagnostics import load_images
from robust_surgery.errors import InvalidInputError

__all__ = ["EncoderHead", "InheritReport", "compare_encoders", "inherit", "random_encoder", "relabel",
           "train_linear_head"]


class _Stop(Exception):
    pass


class EncoderHead(nn.Module):
    """A frozen ``encoder`` read at module ``layer`` (its output, flattened) and a linear ``head``.

    forward: images (N, ...) in [0, 1] -> logits (N, classes). The encoder stops at ``layer``
    (nothing after it runs); its parameters are frozen and it stays in eval mode.
    """

    def __init__(self, encoder: nn.Module, layer: str, head: nn.Linear):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.layer = layer
        self.head = head
        try:
            self._module = encoder.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in encoder.named_modules() if n]
            raise InvalidInputError(f"no module {layer!r} in the encoder; modules: {', '.join(names[:15])}") from None

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output at ``layer`` for x, flattened: (N, F)."""
        store = {}

        def hook(_m, _i, out):
            store["f"] = out
            raise _Stop

        handle = self._module.register_forward_hook(hook)
        try:
            self.encoder(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "f" not in store:
            raise InvalidInputError(f"module {self.layer!r} did not run in the encoder's forward pass")
        return store["f"].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def relabel(labels: torch.Tensor, how: str | None) -> torch.Tensor:
    """A downstream label function on real data: ``parity`` (y mod 2), ``half`` (y ≥ classes / 2),
    ``vehicles`` (CIFAR-10 airplane/automobile/ship/truck vs animals), ``map:a,b,...`` (class i ->
    the i-th number) or None (the same labels). labels: (N,) int64."""
    if how is None or how in ("", "none", "same"):
        return labels
    if how == "parity":
        return labels % 2
    if how == "half":
        return (labels >= (int(labels.max()) + 1 + 1) // 2).long()
    if how == "vehicles":
        return torch.isin(labels, torch.tensor([0, 1, 8, 9])).long()
    if how.startswith("map:"):
        try:
            table = torch.tensor([int(v) for v in how[4:].split(",")])
        except ValueError:
            raise InvalidInputError(f"relabel map must be integers separated by commas, got {how[4:]!r}") from None
        if len(table) <= int(labels.max()):
            raise InvalidInputError(f"relabel map has {len(table)} entries but the labels go up to {int(labels.max())}")
        return table[labels]
    raise InvalidInputError(f"unknown relabelling {how!r}: use parity, half, vehicles, map:a,b,... or none")


def random_encoder(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every parameter re-initialised (each module's ``reset_parameters``): the floor."""
    torch.manual_seed(seed)
    out = copy.deepcopy(model)
    for m in out.modules():
        if hasattr(m, "reset_parameters") and m is not out:
            m.reset_parameters()
    return out.eval()


def train_linear_head(features: torch.Tensor, labels: torch.Tensor, *, epochs: int = 100, lr: float = 1e-2,
                      weight_decay: float = 0.0, batch_size: int = 256, seed: int = 0) -> nn.Linear:
    """A clean linear head on fixed features (N, F) for labels (N,): softmax regression, Adam.

    Features are standardised inside the head (folded into its weight and bias), so the step size
    does not depend on the encoder's scale.
    """
    mu, sd = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mu) / sd
    classes = int(labels.max()) + 1
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], max(classes, 2))
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(z), generator=g)
        for i in range(0, len(z), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(head(z[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():  # fold the standardisation: W (f − μ)/σ + b
        w = head.weight / sd
        head.bias -= (w * mu).sum(1)
        head.weight.copy_(w)
    return head.requires_grad_(False)


@dataclass
class InheritReport:
    """One row per encoder: clean and robust accuracy (%) of its clean linear head."""

    dataset: str
    downstream: str
    layer: str
    threat: str
    eps: list[float]
    n_train: int
    n_test: int
    rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able report (RobustBench-style names: ``clean_acc``, ``robust_acc`` per ε)."""
        return {"dataset": self.dataset, "downstream": self.downstream, "layer": self.layer,
                "threat_model": self.threat, "eps": self.eps, "n_train": self.n_train, "n_examples": self.n_test,
                "rows": self.rows}

    def __rich__(self):
        from rich.table import Table

        t = Table(title=f"Inheritance: clean linear head at {self.layer} on {self.dataset} ({self.downstream}), "
                        f"PGD-{self.threat}, n = {self.n_test}")
        t.add_column("encoder")
        t.add_column("clean %", justify="right")
        for e in self.eps:
            t.add_column(f"ε {e:g}", justify="right")
        for r in self.rows:
            t.add_row(r["encoder"], f"{r['clean_acc']:.1f}", *[f"{r['robust_acc'][str(e)]:.1f}" for e in self.eps])
        return t


def _downstream(data, downstream, n_train: int, n_test: int, data_root):
    """(train images, train labels, test images, test labels, name of the downstream task)."""
    xt, yt, task = load_images(data, n_train, "train", data_root)
    xs, ys, _ = load_images(data, n_test, "test", data_root)
    if task is not None:
        try:
            seed = 1 if downstream in (None, "") else int(downstream)
        except ValueError:
            raise InvalidInputError(f"on synthetic data the downstream task is the seed of another label vector (an integer), "
                             f"got {downstream!r}") from None
        new = task.with_labels(seed)
        _, _, yt = new.features("train")
        _, _, ys = new.features("test")
        return xt, yt[:n_train], xs, ys[:n_test], f"labels of seed {seed}"
    return xt, relabel(yt, downstream), xs, relabel(ys, downstream), downstream or "same labels"


def inherit(encoder: nn.Module, data, layer: str, *, downstream: str | None = None, eps: Sequence[float] = (0.1,),
            threat: str = "Linf", n_train: int = 5000, n_test: int = 500, steps: int = 20, epochs: int = 50,
            seed: int = 0, data_root=None, _split=None) -> dict:
    """Clean and PGD accuracy (%) of a clean linear head on ``encoder`` frozen at module ``layer``.

    data: as :func:`robust_surgery.purification.diagnostics.load_images`; downstream: for the synthetic task
    the seed of another label vector (default 1), for real data a :func:`relabel` rule. ``eps``
    in input (pixel) units. Returns ``{"clean_acc", "robust_acc": {str(ε): %}, "head_train_acc"}``.
    """
    from robust_surgery.evaluation.run import evaluate

    xt, yt, xs, ys, _ = _split or _downstream(data, downstream, n_train, n_test, data_root)
    probe = EncoderHead(encoder, layer, nn.Linear(1, 1))
    with torch.no_grad():
        feats = torch.cat([probe.features(xt[i:i + 512]) for i in range(0, len(xt), 512)])
    probe.head = train_linear_head(feats, yt, epochs=epochs, seed=seed)
    with torch.no_grad():
        train_acc = float((probe.head(feats).argmax(1) == yt).double().mean()) * 100
    report = evaluate(probe, (xs, ys), attacks=("pgd",), eps=eps, threat=threat, steps=steps, seed=seed, checks=False)
    main = report.variants[0]
    worst = report.worst(main)
    return {"clean_acc": 100.0 * report.clean[main] / report.n,
            "robust_acc": {str(e): worst[float(e)] for e in eps}, "head_train_acc": train_acc}


def compare_encoders(encoders: Mapping[str, nn.Module], data, layer: str, *, downstream: str | None = None,
                     eps: Sequence[float] = (0.1,), threat: str = "Linf", n_train: int = 5000, n_test: int = 500,
                     steps: int = 20, epochs: int = 50, seed: int = 0, data_root=None,
                     extra: Mapping[str, Callable[[nn.Module], dict]] | None = None) -> InheritReport:
    """:func:`inherit` for every named encoder on the same downstream split, as one :class:`InheritReport`."""
    if not encoders:
        raise InvalidInputError("give at least one encoder")
    split = _downstream(data, downstream, n_train, n_test, data_root)
    _, _, task = load_images(data, 1, "test", data_root)
    name = task.spec() if task is not None else (data if isinstance(data, str) else "custom")
    report = InheritReport(dataset=str(name), downstream=split[4], layer=layer, threat=threat,
                           eps=[float(e) for e in eps], n_train=len(split[0]), n_test=len(split[2]))
    for enc_name, enc in encoders.items():
        row = inherit(enc, data, layer, eps=eps, threat=threat, steps=steps, epochs=epochs, seed=seed, _split=split)
        report.rows.append({"encoder": enc_name, **row, **((extra or {}).get(enc_name, lambda m: {}))(enc)})
    return report
