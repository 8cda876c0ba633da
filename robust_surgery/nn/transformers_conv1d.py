"""NRPM version of transformers' ``Conv1D`` (GPT-2's projections), imported only when a model has one.

``Conv1D`` is a linear layer with its weight stored transposed, ``(in_features, out_features)``:
``y = x @ weight + bias``. :class:`NRPMConv1D` keeps that parameter as it is (so GPT-2's state dict
and weight tying are untouched) and pattern-matches with ``weight.T``; ``to_dense`` gives back a
``Conv1D`` holding the same tensors.
"""
from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from robust_surgery.nn.functional import nrpm_linear
from robust_surgery.nn.layers import NRPMLayer

__all__ = ["NRPMConv1D"]


class NRPMConv1D(NRPMLayer, Conv1D):
    """NRPM ``transformers.pytorch_utils.Conv1D``. Input (*, nx) -> (*, nf); weight (nx, nf)."""

    dense_type = Conv1D

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return Conv1D.forward(self, x)

    def _nrpm_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nrpm_linear(x, self.weight.t(), self.bias, self._lam_arg(), self.settings, self.memory_budget)

    def __repr__(self) -> str:
        return f"NRPMConv1D(nf={self.nf}, nx={self.nx}, {self.nrpm_extra_repr()})"
