"""NRPM versions of timm's weight-standardized convolutions (BiT's ``StdConv2d``, NFNet's
``ScaledStdConv2d``, and their TensorFlow-"same" ``…Same`` forms), imported only when a model has one.

These layers standardize their kernel on every forward — per output channel, zero mean and unit
variance over its C·kH·kW entries (``F.batch_norm`` over the reshaped weight, with ``eps``), times
``gain · scale`` for the scaled form — and convolve with the result. The NRPM versions compute the
same kernel with the same call and run the NRPM convolution with it (after timm's ``pad_same``
where the layer pads dynamically); at λ = 1 timm's own forward runs, bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

from robust_surgery.nn.layers import _NRPMConvNd

__all__ = ["NRPMStdConv2d", "NRPMStdConv2dSame", "NRPMScaledStdConv2d", "NRPMScaledStdConv2dSame"]


class _NRPMStandardizedConv(_NRPMConvNd):
    """Shared: the standardized kernel (O, C/groups, kH, kW) and the dynamic "same" padding."""

    def _conv_weight(self) -> torch.Tensor:
        gain = (self.gain * self.scale).view(-1) if "gain" in self._parameters else None
        return F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=gain, training=True,
                            momentum=0.0, eps=self.eps).reshape_as(self.weight)

    def _nrpm_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # unbatched, as torch's conv accepts (timm's pad_same needs the batch dim)
            return self._nrpm_forward(x.unsqueeze(0)).squeeze(0)
        if getattr(self, "same_pad", False):
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return _NRPMConvNd._nrpm_forward(self, x)


class NRPMStdConv2d(_NRPMStandardizedConv, StdConv2d):
    """NRPM ``timm.layers.StdConv2d``. Input (B, C, H, W) -> (B, O, H', W')."""

    dense_type = StdConv2d


class NRPMStdConv2dSame(_NRPMStandardizedConv, StdConv2dSame):
    """NRPM ``timm.layers.StdConv2dSame``. Input (B, C, H, W) -> (B, O, ⌈H/s⌉, ⌈W/s⌉)."""

    dense_type = StdConv2dSame


class NRPMScaledStdConv2d(_NRPMStandardizedConv, ScaledStdConv2d):
    """NRPM ``timm.layers.ScaledStdConv2d`` (its ``gain`` is a parameter, trained in paradigm 3).
    Input (B, C, H, W) -> (B, O, H', W')."""

    dense_type = ScaledStdConv2d


class NRPMScaledStdConv2dSame(_NRPMStandardizedConv, ScaledStdConv2dSame):
    """NRPM ``timm.layers.ScaledStdConv2dSame``. Input (B, C, H, W) -> (B, O, ⌈H/s⌉, ⌈W/s⌉)."""

    dense_type = ScaledStdConv2dSame
