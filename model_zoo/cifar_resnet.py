"""He et al. (2016) CIFAR ResNet-20, as in the public ``pytorch_resnet_cifar10`` release (BSD-2).

3 stages of 3 BasicBlocks (widths 16/32/64), option-A shortcuts (identity; where the shape changes,
stride-2 subsampling zero-padded with planes//4 channels on each side), global average pool, final
``linear`` 64 -> 10. The release's normalisation is the model's first module (``normalize``), so
inputs are N x 3 x 32 x 32 pixels in [0,1]; outputs are N x 10 logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.io.zoo import Weights, register_model

from .common import Normalize, resnet_stages

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` with ``pad`` zero channels before and after."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlockA(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus an option-A shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with option-A shortcuts; ``num_blocks=(3, 3, 3)`` is ResNet-20."""

    def __init__(self, num_blocks=(3, 3, 3), num_classes: int = 10,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers = resnet_stages(BasicBlockA, 16, (16, 32, 64), num_blocks)
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # the release's init
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.pool(out)))


@register_model(
    "cifar-resnet20",
    dataset="cifar10",
    weights=Weights(
        "pretrained/resnet20-12fca82f.th",
        sha256="12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
        state_dict_key="state_dict",
        strip_prefix="module.",
        fill_missing_suffixes=(".num_batches_tracked",),
        url="https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet20-12fca82f.th",
    ),
    description="CIFAR ResNet-20 (He et al. 2016, option-A shortcuts, 0.27M params); normalisation inside",
    reference_acc=81.03,
    eval_n=None,
    reference_note="clean accuracy we measured on the 10000 test images of the JPEG CIFAR-10 "
                   "(cifar10-jpeg.tar.gz: 8103/10000); the release reports 91.78 on the original "
                   "binary CIFAR-10: JPEG quality ~75 with 4:2:0 chroma subsampling costs this "
                   "standard-trained model about 10 points. The checkpoint predates BatchNorm's "
                   "num_batches_tracked (left at 0; unused in eval)",
    source="github.com/akamaster/pytorch_resnet_cifar10 (Yerlan Idelbayev)",
    license="BSD-2-Clause",
)
def cifar_resnet20() -> nn.Module:
    """ResNet-20 for CIFAR-10 taking [0,1] inputs."""
    return CifarResNet((3, 3, 3))
