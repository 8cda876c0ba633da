"""MNIST LeNet of the NRPM release, and our retrained copy.

conv1 (1->10, 5x5) -> max-pool 2 -> ReLU -> conv2 (10->20, 5x5) -> Dropout2d -> max-pool 2 -> ReLU
-> flatten (320) -> fc1 (320->50) -> ReLU -> dropout -> fc2 (50->10). Inputs: N x 1 x 28 x 28
pixels in [0,1], no normalisation; outputs N x 10 logits.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_surgery.surgery.presets import register_preset
from robust_surgery.io.zoo import Weights, register_model

from .mnist_mlp import NRPM_SOURCE


class LeNet(nn.Module):
    """The release's LeNet; every step is a module so that hooks and layer surgery can see it."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        self.pool2 = nn.MaxPool2d(2)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(320, 50)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.pool1(self.conv1(x)))
        x = self.relu2(self.pool2(self.conv2_drop(self.conv2(x))))
        x = self.dropout(self.relu3(self.fc1(self.flatten(x))))
        return self.fc2(x)


@register_model(
    "mnist-lenet",
    dataset="mnist",
    weights=Weights(
        "nrpm-official/lenet_mnist_model.pth",
        sha256="a3f7b2aa9f6800fdbf6cdbf952aee04ade4095dcb31071ee8eb609338dd227bb",
    ),
    description="NRPM release's LeNet (2 conv + 2 linear), [0,1] inputs",
    reference_acc=98.1,
    eval_n=None,
    reference_note="clean accuracy on the full MNIST test set (10000 images), conv biases included",
    source=NRPM_SOURCE,
    license="unknown (research release)",
)
def mnist_lenet() -> nn.Module:
    """The release's LeNet (conv1/conv2/fc1/fc2)."""
    return LeNet()


@register_model(
    "mnist-lenet-rs",
    dataset="mnist",
    weights=Weights(
        "embedded:mnist-lenet-rs.safetensors",
        sha256="94f4acb195775a7b603dfaa073499e1e168fb9b2e7599f59f61e8586e737518a",
    ),
    description="Same LeNet, trained by our recipe (model_zoo/train.py); weights ship in the package",
    reference_acc=97.90,
    eval_n=None,
    reference_note="clean accuracy on the full MNIST test set (9790/10000); recipe: Adam lr 1e-3, "
                   "batch 64, 3 epochs, seed 0, plain cross-entropy, no augmentation",
    source="robust-surgery (this project), `surgery zoo train mnist-lenet-rs`",
    license="BSD-3-Clause",
)
def mnist_lenet_rs() -> nn.Module:
    """LeNet, to be filled with our embedded weights."""
    return LeNet()


# The release's LeNet script runs K = 1 with ε = 1e-3; λ = 0.6 as for the MLP.
for _name in ("mnist-lenet", "mnist-lenet-rs"):
    register_preset(_name, norm="L1", K=1, eps=1e-3, lam=0.6,
                    note="the NRPM release's LeNet settings (L1, K=1, ε=1e-3) with λ=0.6")
