"""NRPM version of timm's ``Conv2dSame`` (TensorFlow "same" padding), imported only when a model has one.

``Conv2dSame`` pads each input dynamically so that the output has ⌈size / stride⌉ positions (the
padding depends on the input size, split as TensorFlow does, the extra pixel after), then
convolves without padding. :class:`NRPMConv2dSame` pads the same way with timm's own ``pad_same``
and runs the NRPM convolution on the padded input.
"""
from __future__ import annotations

import torch
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same

from robust_surgery.nn.layers import _NRPMConvNd

__all__ = ["NRPMConv2dSame"]


class NRPMConv2dSame(_NRPMConvNd, Conv2dSame):
    """NRPM ``timm.layers.Conv2dSame``. Input (B, C, H, W) -> (B, O, ⌈H/s⌉, ⌈W/s⌉)."""

    dense_type = Conv2dSame

    def _nrpm_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # unbatched, as torch's conv accepts
            return self._nrpm_forward(x.unsqueeze(0)).squeeze(0)
        return _NRPMConvNd._nrpm_forward(self, pad_same(x, self.weight.shape[-2:], self.stride, self.dilation))
