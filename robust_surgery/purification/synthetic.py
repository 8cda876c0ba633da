"""A synthetic sparse-coding task where the true features are known (``docs/purification.md``).

x = M z + noise with M a random orthonormal d x d dictionary (columns = atoms), z exactly ``k``
active features per sample, |z_i| ~ U[0.8, 1] with a random sign; the label is
sign(<w*, z>) with w* in {±1}^d (``label_seed`` picks another label function on the same data,
the downstream task of the inheritance probe).

The attacks of this project work on [0, 1] inputs, so the task hands out *pixels*
p = 0.5 + x / span (span = 4 keeps every coordinate inside [0, 1]: |x_i| ≤ ‖z‖ ≤ √k, plus noise).
Models built by :func:`sparse_coding_mlp` undo the map in their first module, so the first
Linear layer sees x itself and its weights live in feature space: the true basis is M. A budget
ε in feature units is ε / span in pixel units (:meth:`SparseCodingTask.pixel_eps`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from robust_surgery.errors import InvalidInputError

__all__ = ["SPAN", "FromPixels", "BinaryLogits", "SparseCodingTask", "oracle_mlp", "parse_synthetic_spec",
           "sparse_coding_mlp"]

SPAN = 4.0


@dataclass(frozen=True)
class SparseCodingTask:
    """The task's parameters; everything (dictionary, labels, samples) follows from the seeds.

    ``d``: features = input dimension; ``k``: active features per sample; ``noise``: std of the
    Gaussian noise per coordinate (feature units); ``seed``: the dictionary M and w*;
    ``label_seed``: another label vector (None: w*); ``n_train`` / ``n_test``: sample counts.
    """

    d: int = 64
    k: int = 3
    noise: float = 0.01
    seed: int = 0
    label_seed: int | None = None
    n_train: int = 10000
    n_test: int = 2000
    span: float = SPAN

    def __post_init__(self):
        if self.d < 2 or not 1 <= self.k <= self.d:
            raise InvalidInputError(f"synthetic task needs d >= 2 and 1 <= k <= d, got d={self.d}, k={self.k}")
        if self.noise < 0 or self.n_train < 1 or self.n_test < 1:
            raise InvalidInputError("synthetic task needs noise >= 0 and n_train, n_test >= 1")
        need = 2 * (self.k ** 0.5 + 6 * self.noise)  # |x_i| <= ‖z‖ ≤ √k per coordinate, plus noise
        if self.span < need:
            raise InvalidInputError(f"span {self.span} is too small to keep the inputs in [0, 1]; use at least {need:.2f}")

    @property
    def dictionary(self) -> torch.Tensor:
        """M, d x d, orthonormal; column i is atom i (feature units)."""
        g = torch.Generator().manual_seed(self.seed)
        q, r = torch.linalg.qr(torch.randn(self.d, self.d, generator=g, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()

    @property
    def label_vector(self) -> torch.Tensor:
        """The label function's w in {±1}^d (w* for ``label_seed`` None)."""
        seed = self.seed if self.label_seed is None else 1_000_003 + self.label_seed
        g = torch.Generator().manual_seed(seed + 17)
        return torch.randint(0, 2, (self.d,), generator=g).float() * 2 - 1

    def sample_codes(self, n: int, seed: int) -> torch.Tensor:
        """Sparse codes z, n x d: ``k`` nonzeros per row, |z| ~ U[0.8, 1], random sign."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.rand(n, self.d, generator=g).argsort(1)[:, : self.k]
        mag = 0.8 + 0.2 * torch.rand(n, self.k, generator=g)
        sign = torch.randint(0, 2, (n, self.k), generator=g).float() * 2 - 1
        return torch.zeros(n, self.d).scatter_(1, idx, mag * sign)

    def features(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x n x d in feature units, z n x d, labels n in {0, 1}) of ``split`` ('train' or 'test')."""
        if split not in ("train", "test"):
            raise InvalidInputError(f"split must be 'train' or 'test', got {split!r}")
        n, seed = (self.n_train, 1) if split == "train" else (self.n_test, 2)
        z = self.sample_codes(n, self.seed * 1000 + seed)
        g = torch.Generator().manual_seed(self.seed * 1000 + seed + 500)
        x = z @ self.dictionary.T + self.noise * torch.randn(n, self.d, generator=g)
        score = z @ self.label_vector
        return x, z, (score > 0).long()

    def tensors(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels n x 1 x 1 x d in [0, 1], labels n): what models and attacks take (torchattacks'
        L2 attacks want image-shaped inputs, hence the 1 x 1 x d "image")."""
        x, _, y = self.features(split)
        p = (0.5 + x / self.span).view(len(x), 1, 1, self.d)
        if float(p.min()) < 0 or float(p.max()) > 1:
            raise InvalidInputError("synthetic inputs left [0, 1]; lower the noise or raise span")
        return p, y

    def pixel_eps(self, eps: float) -> float:
        """A budget in feature units (ε on x) as a budget on the [0, 1] pixels the models take."""
        return eps / self.span

    def with_labels(self, label_seed: int | None) -> "SparseCodingTask":
        """The same data with another label function (the downstream task)."""
        return SparseCodingTask(**{**asdict(self), "label_seed": label_seed})

    def spec(self) -> str:
        """The data spec naming this task (``synthetic:d=64,k=3,...``), for the CLI and reports."""
        parts = [f"{k}={v}" for k, v in asdict(self).items() if v is not None]
        return "synthetic:" + ",".join(parts)


def parse_synthetic_spec(spec: str) -> SparseCodingTask | None:
    """``synthetic`` or ``synthetic:d=32,k=3,seed=1,...`` -> the task; other strings -> None."""
    if not isinstance(spec, str) or not (spec == "synthetic" or spec.startswith("synthetic:")):
        return None
    fields = {f: t for f, t in SparseCodingTask.__annotations__.items()}
    kwargs = {}
    for item in filter(None, (s.strip() for s in spec.partition(":")[2].split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise InvalidInputError(f"synthetic data spec item {item!r} not understood; use synthetic:key=value,... with "
                             f"keys {', '.join(fields)}")
        try:
            kwargs[key] = float(value) if key in ("noise", "span") else int(value)
        except ValueError:
            raise InvalidInputError(f"synthetic data spec: {key} must be a number, got {value!r}") from None
    return SparseCodingTask(**kwargs)


class FromPixels(nn.Module):
    """Undo the pixel map of the synthetic task: x = (p − 0.5)·span, flattened (N x ... -> N x d)."""

    def __init__(self, span: float = SPAN):
        super().__init__()
        self.span = float(span)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return (p.flatten(1) - 0.5) * self.span

    def extra_repr(self) -> str:
        return f"span={self.span}"


class BinaryLogits(nn.Module):
    """One score f per input -> logits (0, f), N x 2: cross-entropy on them is the logistic loss."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(f), f], dim=1)


def sparse_coding_mlp(d: int = 64, hidden: int = 256, span: float = SPAN) -> nn.Module:
    """The reference network: pixels N x 1 x 1 x d -> x -> Linear(d, hidden) + ReLU -> Linear(hidden, 1) -> N x 2 logits.

    Layer names: ``fc1`` (the layer whose purity is measured), ``relu``, ``fc2``. Build it
    through ``robust_surgery.io.model_file.build_arch("robust_surgery.purification.synthetic:sparse_coding_mlp", kwargs=...)``
    so a saved copy reloads from its file alone.
    """
    return nn.Sequential(_named(
        ("input", FromPixels(span)), ("fc1", nn.Linear(d, hidden)), ("relu", nn.ReLU()),
        ("fc2", nn.Linear(hidden, 1)), ("logits", BinaryLogits()),
    ))


@torch.no_grad()
def oracle_mlp(task: SparseCodingTask, mix: float = 0.0, threshold: float = 0.4, hidden: int | None = None,
               seed: int = 0) -> nn.Module:
    """A :func:`sparse_coding_mlp` whose ``fc1`` is built, not trained: unit j reads atom j mod d
    with sign ± (alternating every d units), plus ``mix`` times a Gaussian vector of norm about 1
    (0: pure units, PR 1; larger: denser mixtures), rows scaled to unit norm, bias −``threshold``
    (feature units). ``fc2`` is zero: the probe puts its own head on ``relu``. hidden: default 4·d.
    """
    hidden = hidden or 4 * task.d
    model = sparse_coding_mlp(task.d, hidden, task.span)
    g = torch.Generator().manual_seed(seed)
    j = torch.arange(hidden)
    sign = 1.0 - 2.0 * ((j // task.d) % 2).float()
    w = sign[:, None] * task.dictionary.T[j % task.d] + mix * torch.randn(hidden, task.d, generator=g) / task.d ** 0.5
    model.fc1.weight.copy_(w / w.norm(dim=1, keepdim=True))
    model.fc1.bias.fill_(-threshold)
    model.fc2.weight.zero_()
    model.fc2.bias.zero_()
    return model.eval()


def _named(*items):
    from collections import OrderedDict

    return OrderedDict(items)
