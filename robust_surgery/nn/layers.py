"""NRPM layers: drop-in subclasses of ``nn.Linear`` and ``nn.ConvNd``.

Each keeps the original ``weight`` and ``bias`` under the same names (so state dicts line up)
and adds one parameter, ``lam_logit``: λ = sigmoid(lam_logit) is the per-layer mix between the
linear output (λ = 1, exactly the original layer) and the robust NRPM estimate (λ = 0).
The math lives in :mod:`robust_surgery.nn.functional`.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from robust_surgery.nn.functional import DEFAULT_LAM, NRPMSettings, nrpm_conv, nrpm_linear
from robust_surgery.errors import InvalidInputError, InvalidTypeError

__all__ = ["NRPMLayer", "NRPMLinear", "NRPMConv1d", "NRPMConv2d", "NRPMConv3d", "lam_to_logit", "linear_mode", "straight_through_mode"]


def lam_to_logit(lam: float) -> float:
    """logit(λ) for λ in [0, 1] (±inf at the ends, so sigmoid gives 0 and 1 exactly)."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0 or math.isnan(lam):
        raise InvalidInputError(f"lam (λ) must be in [0, 1], got {lam}")
    if lam == 0.0:
        return -math.inf
    if lam == 1.0:
        return math.inf
    return math.log(lam) - math.log1p(-lam)


_KEPT_PRIVATE = ("_reversed_padding_repeated_twice",)


def _copy_layer_state(src: nn.Module, dst: nn.Module, extra_private: tuple[str, ...] = ()) -> None:
    """Give ``dst`` the configuration (stride, padding, ...) of ``src`` and share its tensors.

    Public attributes, torch's private padding cache and the ``extra_private`` attributes are
    copied; parameters, buffers and child modules are shared (no weight is copied); ``lam_logit``
    stays behind; hooks are not carried over.
    """
    kept = _KEPT_PRIVATE + tuple(extra_private)
    for k, v in vars(src).items():
        if (not k.startswith("_") or k in kept) and k not in ("settings", "memory_budget", "force_dense", "straight_through"):
            dst.__dict__[k] = v
    for k, p in src._parameters.items():
        if k != "lam_logit":
            dst._parameters[k] = p
    for k, b in src._buffers.items():
        dst._buffers[k] = b
    for k, m in src._modules.items():
        dst._modules[k] = m
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)


def _no_fused_parent(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing. Its presence is what counts: torch's fused inference
    paths (``nn.TransformerEncoderLayer``'s fast path, in eval mode without gradients) read their
    children's weights directly and never call the children's forward, and torch takes them only
    when no submodule carries a hook. So every NRPM layer carries this one, and a parent with an
    NRPM child always runs the NRPM computation (without it, clean accuracy under ``no_grad`` would
    silently be the dense layer's)."""
    return None


class NRPMLayer:
    """Mixin with what every NRPM layer shares: settings, λ, and the conversion from a dense layer."""

    dense_type: type[nn.Module]
    settings: NRPMSettings
    memory_budget: int | None
    _extra_private: tuple[str, ...] = ()  # private attributes of the dense type that travel with a conversion

    def _reference_weight(self) -> torch.Tensor:
        """The tensor whose dtype and device λ takes."""
        return self.weight

    def _init_nrpm(self, settings: NRPMSettings, lam: float, memory_budget: int | None) -> None:
        self.settings = settings
        self.memory_budget = memory_budget
        ref = self._reference_weight()
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        self.lam_logit = nn.Parameter(torch.tensor(lam_to_logit(lam), dtype=dtype, device=ref.device))
        self._sync_lam_flags()
        if _no_fused_parent not in self._forward_pre_hooks.values():
            self.register_forward_pre_hook(_no_fused_parent)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_lam_flags()

    def _sync_lam_flags(self) -> None:
        """Cache whether λ is exactly 1 or 0 as Python bools, read where λ is set (init, set_lam, loading
        a state_dict), so that forward never reads a tensor's value: no host sync, and forward works
        under torch.export and on the meta device. Training cannot reach λ = 0 or 1 from inside (0, 1)
        (the logit would have to become infinite), and a λ of exactly 0 or 1 stays frozen."""
        if self.lam_logit.is_meta:
            return
        value = float(torch.sigmoid(self.lam_logit.detach()))
        self._lam_is_one, self._lam_is_zero = value == 1.0, value == 0.0

    @property
    def lam(self) -> torch.Tensor:
        """λ = sigmoid(lam_logit), a 0-dim tensor in [0, 1] (differentiable)."""
        return torch.sigmoid(self.lam_logit)

    @property
    def lam_value(self) -> float:
        """λ as a plain float (no gradient)."""
        return float(torch.sigmoid(self.lam_logit.detach()))

    def set_lam(self, lam: float) -> None:
        """Set λ in [0, 1] in place (keeps the parameter object)."""
        with torch.no_grad():
            self.lam_logit.fill_(lam_to_logit(lam))
        self._sync_lam_flags()

    force_dense: bool = False  # set by linear_mode(): run as the original layer whatever λ
    straight_through: bool = False  # set by straight_through_mode(): NRPM values, linear gradients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_dense():
            return self._dense_forward(x)
        if self.straight_through:
            y_lin = self._dense_forward(x)
            with torch.no_grad():
                y = self._nrpm_forward(x)
            return y_lin + (y - y_lin).detach()
        return self._nrpm_forward(x)

    def _lam_arg(self):
        """λ for the functional call: 0.0 (a number: the linear term is skipped) when exactly 0 and frozen,
        else the tensor (so autograd still sees λ where it is a trainable parameter)."""
        return 0.0 if self._lam_is_zero and not self.lam_logit.requires_grad else self.lam

    def _runs_dense(self) -> bool:
        """True when the output equals the original layer: λ == 1, norm L2, K == 0 or linear_mode."""
        return self.force_dense or self.settings.is_linear or self._lam_is_one

    def nrpm_extra_repr(self) -> str:
        s = self.settings
        extra = f", gamma={s.gamma}, delta={s.delta}" if s.norm in ("MCP", "Huber", "HM") else ""
        return f"norm={s.norm}, K={s.K}, eps={s.eps:g}, lam={self.lam_value:.4g}{extra}"

    @classmethod
    def from_dense(cls, layer: nn.Module, settings: NRPMSettings | None = None, lam: float = DEFAULT_LAM,
                   memory_budget: int | None = None):
        """Build the NRPM layer from a plain one (a ``dense_type`` or a subclass of it that computes
        the same, e.g. ``NonDynamicallyQuantizableLinear``), sharing its weight and bias tensors;
        :meth:`to_dense` gives back the layer's own class."""
        if not isinstance(layer, cls.dense_type):
            raise InvalidTypeError(f"{cls.__name__}.from_dense needs an nn.{cls.dense_type.__name__}, got {type(layer).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        _copy_layer_state(layer, new, cls._extra_private)
        if type(layer) is not cls.dense_type:
            new._dense_class = type(layer)
        new._init_nrpm(settings or NRPMSettings(), lam, memory_budget)
        new.train(layer.training)
        return new

    def to_dense(self) -> nn.Module:
        """The plain layer, of the class it was converted from, with the same weight and bias tensors
        (λ and settings dropped)."""
        cls = getattr(self, "_dense_class", self.dense_type)
        dense = cls.__new__(cls)
        nn.Module.__init__(dense)
        _copy_layer_state(self, dense, self._extra_private)
        dense.train(self.training)
        return dense


@contextlib.contextmanager
def _layer_flag(model: nn.Module, flag: str):
    layers = [m for m in model.modules() if isinstance(m, NRPMLayer)]
    old = [getattr(m, flag) for m in layers]
    for m in layers:
        setattr(m, flag, True)
    try:
        yield model
    finally:
        for m, o in zip(layers, old):
            setattr(m, flag, o)


def linear_mode(model: nn.Module):
    """Context manager: inside it every NRPM layer of ``model`` runs as its original layer (λ = 1)."""
    return _layer_flag(model, "force_dense")


def straight_through_mode(model: nn.Module):
    """Context manager: NRPM forward values, gradients of the original linear layer (BPDA).

    The surrogate an honest evaluation attacks through when NRPM's own gradients may mislead.
    """
    return _layer_flag(model, "straight_through")


class NRPMLinear(NRPMLayer, nn.Linear):
    """NRPM ``nn.Linear``. Input (*, in_features) -> (*, out_features)."""

    dense_type = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 settings: NRPMSettings | None = None, lam: float = DEFAULT_LAM,
                 memory_budget: int | None = None, device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_nrpm(settings or NRPMSettings(), lam, memory_budget)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear.forward(self, x)

    def _nrpm_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nrpm_linear(x, self.weight, self.bias, self._lam_arg(), self.settings, self.memory_budget)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.nrpm_extra_repr()}"


class _NRPMConvNd(NRPMLayer):
    """Shared forward of the NRPM convolutions."""

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_type.forward(self, x)

    def _nrpm_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == len(self.kernel_size) + 1:  # unbatched input, as torch's conv accepts
            return self._nrpm_forward(x.unsqueeze(0)).squeeze(0)
        padding = self.padding if self.padding_mode == "zeros" else 0
        xp = x
        if self.padding_mode != "zeros":
            xp = nn.functional.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return nrpm_conv(
            xp, self._conv_weight(), self.bias, self._lam_arg(), self.settings,
            stride=self.stride, padding=padding, dilation=self.dilation, groups=self.groups,
            memory_budget=self.memory_budget,
        )

    def _conv_weight(self) -> torch.Tensor:
        """The kernel the layer convolves with: ``weight`` (a layer that transforms it first, as
        weight standardization does, overrides this)."""
        return self.weight

    def extra_repr(self) -> str:
        return f"{self.dense_type.extra_repr(self)}, {self.nrpm_extra_repr()}"


def _conv_init(self, dense_type, in_channels, out_channels, kernel_size, stride, padding, dilation,
               groups, bias, padding_mode, settings, lam, memory_budget, device, dtype):
    dense_type.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                        groups, bias, padding_mode, device=device, dtype=dtype)
    self._init_nrpm(settings or NRPMSettings(), lam, memory_budget)


class NRPMConv1d(_NRPMConvNd, nn.Conv1d):
    """NRPM ``nn.Conv1d``. Input (B, C, W) -> (B, O, W')."""

    dense_type = nn.Conv1d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", *, settings=None, lam=DEFAULT_LAM,
                 memory_budget=None, device=None, dtype=None):
        _conv_init(self, nn.Conv1d, in_channels, out_channels, kernel_size, stride, padding, dilation,
                   groups, bias, padding_mode, settings, lam, memory_budget, device, dtype)


class NRPMConv2d(_NRPMConvNd, nn.Conv2d):
    """NRPM ``nn.Conv2d``. Input (B, C, H, W) -> (B, O, H', W')."""

    dense_type = nn.Conv2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", *, settings=None, lam=DEFAULT_LAM,
                 memory_budget=None, device=None, dtype=None):
        _conv_init(self, nn.Conv2d, in_channels, out_channels, kernel_size, stride, padding, dilation,
                   groups, bias, padding_mode, settings, lam, memory_budget, device, dtype)


class NRPMConv3d(_NRPMConvNd, nn.Conv3d):
    """NRPM ``nn.Conv3d``. Input (B, C, D, H, W) -> (B, O, D', H', W')."""

    dense_type = nn.Conv3d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", *, settings=None, lam=DEFAULT_LAM,
                 memory_budget=None, device=None, dtype=None):
        _conv_init(self, nn.Conv3d, in_channels, out_channels, kernel_size, stride, padding, dilation,
                   groups, bias, padding_mode, settings, lam, memory_budget, device, dtype)
