"""MNIST linear MLP 784 -> 256 -> 64 -> 10 (the NRPM release's ``mlp3``), and our retrained copy.

The release's MLP has NO activation between its layers: as an LPM network it is a linear
classifier; NRPM layers are what make it nonlinear. Inputs: N x 1 x 28 x 28 pixels in [0,1].
"""
from __future__ import annotations

import torch
from torch import nn

from robust_surgery.surgery.presets import register_preset
from robust_surgery.io.zoo import Weights, register_model

NRPM_SOURCE = ("NRPM public release (Hou, Torkamani, Krim, Liu, 'Robustness Reprogramming for "
               "Representation Learning', arXiv 2410.04577); license not stated in the release")


class LinearMLP(nn.Module):
    """Flatten -> fc1 (784->256) -> fc2 (256->64) -> fc3 (64->10), no activations; N x 10 logits."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, int] = (256, 64), num_classes: int = 10):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.fc1(self.flatten(x))))


@register_model(
    "mnist-mlp",
    dataset="mnist",
    weights=Weights(
        "nrpm-official/mlp3_mnist_model.pth",
        sha256="a2c7bb57c3c65ec3d49e9944c914aeb580e2570ff3acfd32d783c1174b27aaa4",
        drop_suffixes=(".robust_sum.lmbd",),
    ),
    description="NRPM release's linear MLP 784-256-64-10 (no activations), [0,1] inputs",
    reference_acc=91.2,
    eval_n=1000,
    reference_note="clean accuracy on the first 1000 MNIST test images (912/1000); the release's unused "
                   "robust_sum.lmbd (0.5 per layer) keys are dropped",
    source=NRPM_SOURCE,
    license="unknown (research release)",
)
def mnist_mlp() -> nn.Module:
    """The release's linear MLP (fc1/fc2/fc3)."""
    return LinearMLP()


@register_model(
    "mnist-mlp-rs",
    dataset="mnist",
    weights=Weights(
        "embedded:mnist-mlp-rs.safetensors",
        sha256="3c57b2887daeec30252123283740daf3a1420ed3ccae7c24ba22d355586b422d",
    ),
    description="Same linear MLP, trained by our recipe (model_zoo/train.py); weights ship in the package",
    reference_acc=92.01,
    eval_n=None,
    reference_note="clean accuracy on the full MNIST test set (9201/10000); recipe: Adam lr 1e-3, "
                   "batch 128, 2 epochs, seed 0, plain cross-entropy, no augmentation",
    source="robust-surgery (this project), `surgery zoo train mnist-mlp-rs`",
    license="BSD-3-Clause",
)
def mnist_mlp_rs() -> nn.Module:
    """The linear MLP, to be filled with our embedded weights."""
    return LinearMLP()


# The release's MLP script: L1, K = 1, ε = 5e-5, λ = 0.6 (docs/cli.md, Presets). Our retrained copy has the same
# architecture and input scale, so the same settings fit it.
for _name in ("mnist-mlp", "mnist-mlp-rs"):
    register_preset(_name, norm="L1", K=1, eps=5e-5, lam=0.6,
                    note="the NRPM release's MLP settings (L1, K=1, ε=5e-5, λ=0.6)")
