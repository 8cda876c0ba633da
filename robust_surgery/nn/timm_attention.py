"""timm's attention layers that add a q/k/v bias of their own: made to call their ``qkv`` module.

timm's BEiT ``Attention``, EVA's ``EvaAttention`` and Swin-V2's ``WindowAttention`` keep
``q_bias``/``k_bias``/``v_bias`` on the parent and, by default, compute
``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))``: an NRPM layer put in place of
``qkv`` would never run, and the converted model would silently be the dense one. timm has a
switch for the other path, ``qkv_bias_separate`` (``self.qkv(x)`` first, the bias added after).
The classes here are the same modules whose ``qkv_bias_separate`` reads True whenever ``qkv`` is an
NRPM layer set to compute NRPM (λ < 1, not the L2/K = 0 linear case) or run under
``linear_mode`` (so the report's probe sees it run); otherwise, and when it is plain, the
attribute reads as the model set it, so at λ = 1 the output is timm's bit for bit.
NRPM adds its bias after the robust estimate, so the separate bias is the same computation.
``convert`` switches such a parent when it converts its ``qkv`` (only where the installed timm
has the switch); ``unconvert`` switches it back. Imported only when a model holds one.
"""
from __future__ import annotations

from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention

from robust_surgery.nn.layers import NRPMLayer

__all__ = ["QkvBiasAfterNRPM", "ModuleCallingBeitAttention", "ModuleCallingEvaAttention",
           "ModuleCallingSwinV2WindowAttention"]


class QkvBiasAfterNRPM:
    """Mixin: ``qkv_bias_separate`` is True while ``self.qkv`` is an NRPM layer set to compute NRPM
    (or under ``linear_mode``)."""

    @classmethod
    def can_route(cls, module) -> bool:
        """True when this timm has the switch (an instance attribute ``qkv_bias_separate``)."""
        return "qkv_bias_separate" in vars(module)

    @property
    def qkv_bias_separate(self) -> bool:
        qkv = self.__dict__["_modules"].get("qkv")
        if not isinstance(qkv, NRPMLayer):
            return self.__dict__["qkv_bias_separate"]
        # under linear_mode the layer is still called (it runs as the dense layer), so the report's
        # probe, which runs under linear_mode, sees it run whatever λ
        computes_nrpm = qkv.force_dense or not qkv._runs_dense()
        return computes_nrpm or self.__dict__["qkv_bias_separate"]

    @qkv_bias_separate.setter
    def qkv_bias_separate(self, value: bool) -> None:
        self.__dict__["qkv_bias_separate"] = bool(value)


class ModuleCallingBeitAttention(QkvBiasAfterNRPM, BeitAttention):
    """timm's BEiT ``Attention``, calling ``self.qkv`` when it is NRPM: (B, N, C) -> (B, N, C)."""

    calls_children_of = BeitAttention


class ModuleCallingEvaAttention(QkvBiasAfterNRPM, EvaAttention):
    """timm's ``EvaAttention``, calling ``self.qkv`` when it is NRPM: (B, N, C) -> (B, N, C)."""

    calls_children_of = EvaAttention


class ModuleCallingSwinV2WindowAttention(QkvBiasAfterNRPM, SwinV2WindowAttention):
    """timm's Swin-V2 ``WindowAttention``, calling ``self.qkv`` when it is NRPM: (B·windows, T, C) -> same."""

    calls_children_of = SwinV2WindowAttention
