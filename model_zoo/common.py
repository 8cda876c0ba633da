"""Small layers shared by the zoo architectures."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for N x C x H x W inputs in [0,1].

    ``mean``/``std`` are non-persistent buffers: they follow ``.to(device)`` but are not part of
    the state_dict, so checkpoints of the bare network load unchanged.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def resnet_stages(block: Callable[[int, int, int], nn.Module], in_planes: int, widths: Sequence[int],
                  num_blocks: Sequence[int]) -> list[nn.Sequential]:
    """The residual stages of a CIFAR ResNet: stage i has ``num_blocks[i]`` blocks of width
    ``widths[i]``; every stage but the first starts with a stride-2 block."""
    stages = []
    for i, (planes, n) in enumerate(zip(widths, num_blocks)):
        blocks = []
        for j in range(n):
            blocks.append(block(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
            in_planes = planes
        stages.append(nn.Sequential(*blocks))
    return stages
