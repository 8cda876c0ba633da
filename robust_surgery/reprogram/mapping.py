"""Output label mappings of reprogramming: target class j <- a set S_j of source classes.

h_j(F) = mean of the source probabilities F_s over s in S_j (``docs/reprogramming.md``). Every target
class gets the same number m of source labels, so a mapping is one ``(n_target, m)`` index
tensor; source labels are never shared between target classes.

:class:`LinearMapping` is the learned alternative (AR only): a trained affine layer on the
source log-probabilities, h = softmax(A log F + b), started at one-to-one.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_surgery.errors import InvalidInputError

_LOG_FLOOR = 1e-12


class LabelMapping(nn.Module):
    """Map source-class probabilities ``(B, n_source)`` to target-class scores ``(B, n_target)``.

    ``assignment``: ``(n_target, m)`` long tensor, row j = the m source labels of target class j.
    ``forward`` returns the mean source probability of each row (values in [0, 1]; rows of a
    full partition sum to at most 1). Stored as a buffer so it saves and loads with the model.
    """

    def __init__(self, assignment: torch.Tensor, n_source: int):
        super().__init__()
        assignment = torch.as_tensor(assignment, dtype=torch.long)
        if assignment.dim() == 1:
            assignment = assignment[:, None]
        if assignment.dim() != 2 or assignment.numel() == 0:
            raise InvalidInputError(f"a label mapping is an (n_target, m) index table, got shape {tuple(assignment.shape)}")
        if int(assignment.min()) < 0 or int(assignment.max()) >= n_source:
            raise InvalidInputError(f"label mapping uses source labels outside 0..{n_source - 1}: {assignment.tolist()}")
        if assignment.unique().numel() != assignment.numel():
            raise InvalidInputError(f"label mapping assigns a source label to two target classes: {assignment.tolist()}")
        self.n_source = int(n_source)
        self.register_buffer("assignment", assignment)

    @property
    def n_target(self) -> int:
        return self.assignment.shape[0]

    @property
    def m(self) -> int:
        """Source labels per target class."""
        return self.assignment.shape[1]

    def forward(self, source_probs: torch.Tensor) -> torch.Tensor:
        """``(B, n_source)`` probabilities -> ``(B, n_target)`` mean probability over each S_j."""
        _check_width(source_probs, self.n_source)
        return source_probs[..., self.assignment].mean(dim=-1)

    def to_dict(self) -> dict:
        """JSON-able description (for manifests and reports)."""
        return {"n_source": self.n_source, "assignment": self.assignment.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelMapping":
        return cls(torch.tensor(d["assignment"], dtype=torch.long), d["n_source"])

    def extra_repr(self) -> str:
        return f"n_target={self.n_target}, n_source={self.n_source}, m={self.m}"


class LinearMapping(nn.Module):
    """A learned output layer: ``(B, n_source)`` source probabilities F → ``(B, n_target)``
    probabilities h = softmax(A · log F + b).

    A ``(n_target, n_source)`` and b ``(n_target,)`` are trained with the program (AR; they need
    gradients, so BAR cannot use it). They start at one-to-one (A = the first ``n_target`` rows
    of the identity, b = 0), where h is the one-to-one mapping's probabilities renormalised over
    the target classes. A and b are parameters, saved in the model's state.
    """

    kind = "linear"

    def __init__(self, n_target: int, n_source: int):
        super().__init__()
        if n_target < 1 or n_source < 1:
            raise InvalidInputError(f"a linear mapping needs at least one target and one source class (got {n_target}, {n_source})")
        self.n_source = int(n_source)
        self.weight = nn.Parameter(torch.eye(n_target, n_source))
        self.bias = nn.Parameter(torch.zeros(n_target))

    @property
    def n_target(self) -> int:
        return self.weight.shape[0]

    def forward(self, source_probs: torch.Tensor) -> torch.Tensor:
        """``(B, n_source)`` probabilities -> ``(B, n_target)`` probabilities (rows sum to 1)."""
        _check_width(source_probs, self.n_source)
        logits = nn.functional.linear(source_probs.clamp_min(_LOG_FLOOR).log(), self.weight, self.bias)
        return torch.softmax(logits, dim=-1)

    def to_dict(self) -> dict:
        """JSON-able description (the weights live in the model's state)."""
        return {"kind": self.kind, "n_source": self.n_source, "n_target": self.n_target}

    def extra_repr(self) -> str:
        return f"n_target={self.n_target}, n_source={self.n_source}, learned"


def _check_width(source_probs: torch.Tensor, n_source: int) -> None:
    if source_probs.shape[-1] != n_source:
        raise InvalidInputError(f"the source model gives {source_probs.shape[-1]} classes, the mapping expects {n_source}")


def mapping_from_dict(d: dict) -> nn.Module:
    """Rebuild a mapping from its ``to_dict()``: a :class:`LinearMapping` for ``kind == "linear"``,
    else a :class:`LabelMapping` (an index table; older files have no ``kind``). Any other kind is
    refused: a file's description chooses among these two classes only."""
    kind = d.get("kind", "table")
    if kind == LinearMapping.kind:
        return LinearMapping(int(d["n_target"]), int(d["n_source"]))
    if kind != "table":
        raise InvalidInputError(f"unknown label-mapping kind {kind!r} in the model file (known: table, linear)")
    return LabelMapping.from_dict(d)


def _check_sizes(n_target: int, n_source: int, m: int) -> None:
    if n_target < 1 or m < 1:
        raise InvalidInputError(f"need at least one target class and one source label per class (got {n_target}, m={m})")
    if n_target * m > n_source:
        raise InvalidInputError(f"{n_target} target classes x {m} labels each need {n_target * m} source classes, "
                         f"the source has only {n_source}; lower m")


def one_to_one(n_target: int, n_source: int) -> LabelMapping:
    """Target class j <- source class j (the first ``n_target`` source classes): the baseline."""
    _check_sizes(n_target, n_source, 1)
    return LabelMapping(torch.arange(n_target)[:, None], n_source)


def random_mapping(n_target: int, n_source: int, m: int = 1, seed: int = 0) -> LabelMapping:
    """m distinct random source labels per target class (BAR's baseline mapping)."""
    _check_sizes(n_target, n_source, m)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_source, generator=g)[: n_target * m]
    return LabelMapping(perm.view(n_target, m), n_source)


def frequency_mapping(source_pred: torch.Tensor, target_labels: torch.Tensor, n_target: int, n_source: int,
                      m: int = 1) -> LabelMapping:
    """BAR's frequency mapping from the source-label histogram of the target training data.

    ``source_pred``: ``(N,)`` source labels predicted on the (unprogrammed) target inputs, or
    ``(N, n_source)`` probabilities (argmax taken); ``target_labels``: ``(N,)``. Greedy: take the
    most frequent (source, target) pair, assign it, remove that source label (and the target
    class once it has m labels), repeat. Ties go to the smaller (source, target) index.
    """
    _check_sizes(n_target, n_source, m)
    source_pred = torch.as_tensor(source_pred)
    if source_pred.dim() == 2:
        source_pred = source_pred.argmax(dim=1)
    target_labels = torch.as_tensor(target_labels, dtype=torch.long)
    if source_pred.shape != target_labels.shape:
        raise InvalidInputError(f"source predictions {tuple(source_pred.shape)} and target labels "
                         f"{tuple(target_labels.shape)} must have one entry per target example")
    hist = torch.zeros(n_source, n_target, dtype=torch.float64)
    hist.index_put_((source_pred.long(), target_labels), torch.ones(len(target_labels), dtype=torch.float64),
                    accumulate=True)
    chosen: list[list[int]] = [[] for _ in range(n_target)]
    for _ in range(n_target * m):
        flat = int(torch.argmax(hist))  # first maximum in row-major order: smallest (source, target)
        s, t = divmod(flat, n_target)
        chosen[t].append(s)
        hist[s, :] = -1.0  # source label used
        if len(chosen[t]) == m:
            hist[:, t] = -1.0  # target class full
    return LabelMapping(torch.tensor(chosen, dtype=torch.long), n_source)
