"""TRADES's SmallCNN for MNIST (Zhang et al. 2019), the architecture the adversarial-training
literature uses at ε = 0.3.

conv 1→32 3×3, ReLU, conv 32→32 3×3, ReLU, max-pool 2, conv 32→64 3×3, ReLU, conv 64→64 3×3,
ReLU, max-pool 2, flatten (64·4·4 = 1024), fc1 1024→200, ReLU, dropout 0.5, fc2 200→200, ReLU,
fc3 200→10. 312,202 parameters (1.2 MB in float32). Inputs: N × 1 × 28 × 28 pixels in [0, 1],
no normalisation; outputs N × 10 logits.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_surgery.io.zoo import Weights, register_model
from robust_surgery.surgery.presets import register_preset


class SmallCNN(nn.Module):
    """SmallCNN; every step is a module so that hooks and layer surgery can see it."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 32, 3), nn.ReLU()
        self.conv2, self.relu2, self.pool1 = nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.conv3, self.relu3 = nn.Conv2d(32, 64, 3), nn.ReLU()
        self.conv4, self.relu4, self.pool2 = nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1, self.relu5, self.drop = nn.Linear(1024, 200), nn.ReLU(), nn.Dropout(dropout)
        self.fc2, self.relu6 = nn.Linear(200, 200), nn.ReLU()
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.pool2(self.relu4(self.conv4(self.relu3(self.conv3(x)))))
        x = self.drop(self.relu5(self.fc1(self.flatten(x))))
        return self.fc3(self.relu6(self.fc2(x)))


@register_model(
    "mnist-cnn",
    dataset="mnist",
    weights=Weights("embedded:mnist-cnn.safetensors", sha256="bb905d1f85134ac8c2662412db0bd6f9474fab46ec0a362829377ead4ece151a"),
    description="TRADES's SmallCNN (4 convs + 3 linear, 0.31 M parameters), trained clean by our recipe; "
                "weights ship in the package",
    reference_acc=98.93,
    eval_n=None,
    reference_note="clean accuracy on the full MNIST test set (9893/10000); recipe: Adam lr 1e-3, batch 128, 3 epochs, seed 0, "
                   "plain cross-entropy, no augmentation (`surgery zoo train mnist-cnn`)",
    source="robust-surgery (this project), `surgery zoo train mnist-cnn`",
    license="BSD-3-Clause",
)
def mnist_cnn() -> nn.Module:
    """SmallCNN, to be filled with our embedded weights."""
    return SmallCNN()


# Like the LeNet's: L1, K = 1, ε = 1e-3, λ = 0.6 (the NRPM release's small-network settings).
register_preset("mnist-cnn", norm="L1", K=1, eps=1e-3, lam=0.6,
                note="the NRPM release's small-network settings (L1, K=1, ε=1e-3) with λ=0.6")
