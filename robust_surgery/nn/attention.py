"""NRPM ``nn.MultiheadAttention``: its query, key and value projections become robust pattern matches.

``nn.MultiheadAttention`` keeps its projections as bare parameters (``in_proj_weight`` or
``q/k/v_proj_weight``) and passes ``out_proj.weight`` to ``F.multi_head_attention_forward``, so
converting its ``out_proj`` child alone would change nothing. :class:`NRPMMultiheadAttention`
computes the three input projections itself (NRPM, mixed by this layer's λ), then runs torch's own
attention function with identity projections (multiplying by an identity matrix is exact in
floating point) so masks, ``bias_k``/``bias_v``, ``add_zero_attn``, dropout, ``need_weights`` and
``is_causal`` behave exactly as torch's, and finally calls its ``out_proj`` module — which
``convert`` turns into its own NRPM layer (an ``NRPMLinear`` with its own λ). At λ = 1 with a plain or
λ = 1 ``out_proj`` it is torch's forward, unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.nn.functional import nrpm_linear
from robust_surgery.nn.layers import NRPMLayer

__all__ = ["NRPMMultiheadAttention"]


class NRPMMultiheadAttention(NRPMLayer, nn.MultiheadAttention):
    """NRPM ``nn.MultiheadAttention``: same arguments, parameters and outputs ((L, N, E) or
    (N, L, E) with ``batch_first``; attention weights (N, L, S) when ``need_weights``)."""

    dense_type = nn.MultiheadAttention
    _extra_private = ("_qkv_same_embed_dim",)

    def _reference_weight(self) -> torch.Tensor:
        return self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight

    def _plain(self) -> bool:
        """True when the output is torch's own: these projections dense and out_proj plain or dense
        (torch's forward then reads out_proj's weight itself; conversion reports count it as run)."""
        out = self.out_proj
        return self._runs_dense() and (not isinstance(out, NRPMLayer) or out._runs_dense())

    def _project(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self._runs_dense():
            return F.linear(x, w, b)
        if self.straight_through:
            y_lin = F.linear(x, w, b)
            with torch.no_grad():
                y = nrpm_linear(x, w, b, self._lam_arg(), self.settings, self.memory_budget)
            return y_lin + (y - y_lin).detach()
        return nrpm_linear(x, w, b, self._lam_arg(), self.settings, self.memory_budget)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._plain():
            return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                                 average_attn_weights, is_causal)
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = self._project(query, wq, bq), self._project(key, wk, bk), self._project(value, wv, bv)
        batched = query.dim() == 3
        if self.batch_first and batched:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        eye = torch.eye(E, dtype=q.dtype, device=q.device)
        out, weights = F.multi_head_attention_forward(
            q, k, v, E, self.num_heads, None, None, self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            eye, None, training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
            v_proj_weight=eye, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        return self.out_proj(out), weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {self.nrpm_extra_repr()}"
