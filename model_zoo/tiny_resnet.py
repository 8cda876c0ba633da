"""The NRPM release's narrow CIFAR ResNet-18 (``TinyRobNetLearn18``) as plain layers.

3x3 stem conv (3->8) + BN + ReLU, BasicBlock x [2, 2, 2, 2] with widths 8/16/32/64 (strides
1/2/2/2; shortcut = 1x1 conv + BN where the shape changes), average pool 4, final ``linear``
64 -> 10. Inputs: N x 3 x 32 x 32 pixels in [0,1], no normalisation; outputs N x 10 logits. The
release's 16 block convs were a robust variant with one extra parameter (``robust_sum.beta``, all
0.0 in the checkpoint); here they are plain convs and those keys are dropped (``zoo_info``).
"""
from __future__ import annotations

import torch
from torch import nn

from robust_surgery.surgery.presets import register_preset
from robust_surgery.io.zoo import Weights, register_model

from .common import resnet_stages
from .mnist_mlp import NRPM_SOURCE


class BasicBlockB(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (1x1 conv + BN where needed) shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class TinyResNet18(nn.Module):
    """Narrow CIFAR ResNet-18 (widths 8/16/32/64)."""

    def __init__(self, widths=(8, 16, 32, 64), num_blocks=(2, 2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        layers = resnet_stages(BasicBlockB, widths[0], widths, num_blocks)
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AvgPool2d(4)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.flatten(self.pool(out)))


@register_model(
    "cifar-tiny-resnet18",
    dataset="cifar10",
    weights=Weights(
        "nrpm-official/tinyresnet18_cifar10_model.t7",
        sha256="c376ba2670ee7c82a9f5794f9aadb61455902de638e790716dbe21ff7879c90a",
        state_dict_key="net",
        strip_prefix="module.",
        drop_suffixes=(".robust_sum.beta",),
    ),
    description="NRPM release's narrow ResNet-18 (TinyRobNetLearn18, PGD-trained) as plain convs, [0,1] inputs",
    reference_acc=67.27,
    eval_n=None,
    reference_note="clean accuracy we measured with plain convs on the 10000 test images of the JPEG "
                   "CIFAR-10 (6727/10000); the release's 67.89 was measured with its robust convs. 16 "
                   "robust_sum.beta keys (all 0.0) are dropped",
    source=NRPM_SOURCE,
    license="unknown (research release)",
)
def cifar_tiny_resnet18() -> nn.Module:
    """The narrow ResNet-18 with plain convs."""
    return TinyResNet18()


# In the release only the 16 block convs were robust (stem, shortcuts and the final Linear stayed
# linear); its ResNet test scripts use K = 1, ε = 5e-4.
register_preset("cifar-tiny-resnet18", norm="L1", K=1, eps=5e-4, include="re:layer\\d\\.\\d\\.conv\\d",
                note="the NRPM release's ResNet settings: the 16 block convs only, L1, K=1, ε=5e-4")
