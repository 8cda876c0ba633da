"""Model surgery: swap Linear/Conv layers for NRPM layers (and back).

``convert(model, paradigm=1, ...)`` walks any ``nn.Module``, selects layers by type and by
fully qualified name (exact, glob, or ``re:`` regex, as torchao's filters do), and replaces
them with their NRPM versions. ``unconvert`` restores plain layers. Converters for further
layer types plug in with ``@register_converter(LayerType)``.
"""
from __future__ import annotations

import copy
import fnmatch
import importlib
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from robust_surgery._meta import get_meta, set_meta
from robust_surgery.nn.functional import DEFAULT_LAM, DEFAULTS, LAYER_SETTING_NAMES, NRPMSettings
from robust_surgery.nn.attention import NRPMMultiheadAttention
from robust_surgery.nn.layers import NRPMConv1d, NRPMConv2d, NRPMConv3d, NRPMLayer, NRPMLinear
from robust_surgery.errors import InvalidInputError, InvalidTypeError

__all__ = [
    "LayerConfig",
    "register_converter",
    "convertible_types",
    "converter_for",
    "skipped_layers",
    "convert",
    "unconvert",
    "nrpm_layers",
    "set_lam",
    "NoLayerMatchedError",
    "PARADIGMS",
]

PARADIGMS = {
    1: "no fine-tuning: λ and the IRLS knobs set by hand",
    2: "fine-tune only the per-layer λ (every other parameter frozen)",
    3: "fine-tune every parameter and λ",
}


class NoLayerMatchedError(InvalidInputError):
    """Raised when ``convert`` selects no layer at all."""


@dataclass(frozen=True)
class LayerConfig:
    """Everything a converter needs for one layer: the NRPM knobs, λ and the memory budget (bytes)."""

    settings: NRPMSettings = field(default_factory=NRPMSettings)
    lam: float = 0.5
    memory_budget: int | None = None

    def __post_init__(self):
        _check_lam(self.lam)

    def to_dict(self) -> dict:
        return {**self.settings.to_dict(), "lam": self.lam}


Converter = Callable[[nn.Module, LayerConfig], nn.Module]
_CONVERTERS: dict[type, Converter] = {}


def register_converter(layer_type: type) -> Callable[[Converter], Converter]:
    """Register ``fn(module, config: LayerConfig) -> nn.Module`` for modules of exactly ``layer_type``.

    The returned module should be an :class:`~robust_surgery.nn.NRPMLayer` (it carries
    ``settings`` and ``lam_logit``) and have a ``to_dense()`` method so ``unconvert`` and
    saving work. Matching is by exact type, and a subclass that does not override ``forward``
    (``NonDynamicallyQuantizableLinear``) or is listed in :data:`EQUIVALENT_SUBCLASSES` is
    converted as its base; a subclass with a ``forward`` of its own needs its own converter.
    """

    def wrap(fn: Converter) -> Converter:
        _CONVERTERS[layer_type] = fn
        return fn

    return wrap


def convertible_types() -> tuple[type, ...]:
    """The layer types ``convert`` has a converter for so far (library layers join on first sight,
    see :data:`LIBRARY_LAYERS`; subclasses of these may convert as their base, see :func:`converter_for`)."""
    return tuple(_CONVERTERS)


# Layer types of optional libraries, by their class's import path, and our NRPM class for each;
# imported only when a model holds such a layer (our own modules: nothing read from a file picks them).
LIBRARY_LAYERS: dict[str, str] = {
    "transformers.pytorch_utils.Conv1D": "robust_surgery.nn.transformers_conv1d:NRPMConv1D",
    "timm.layers.conv2d_same.Conv2dSame": "robust_surgery.nn.timm_conv2d_same:NRPMConv2dSame",
    "timm.layers.std_conv.StdConv2d": "robust_surgery.nn.timm_std_conv:NRPMStdConv2d",
    "timm.layers.std_conv.StdConv2dSame": "robust_surgery.nn.timm_std_conv:NRPMStdConv2dSame",
    "timm.layers.std_conv.ScaledStdConv2d": "robust_surgery.nn.timm_std_conv:NRPMScaledStdConv2d",
    "timm.layers.std_conv.ScaledStdConv2dSame": "robust_surgery.nn.timm_std_conv:NRPMScaledStdConv2dSame",
}
# Parents whose forward reads their children's weights (``F.linear(x, self.qkv.weight)``), so NRPM children
# would never run, and the class (same module, a forward that calls the children) that ``convert`` switches
# such a parent to when it converts one of its children; ``unconvert`` switches it back. By import path,
# imported only when a model holds one (our own modules: nothing read from a file picks them).
WEIGHT_READING_PARENTS: dict[str, str] = {
    "torchvision.models.swin_transformer.ShiftedWindowAttention":
        "robust_surgery.nn.swin:ModuleCallingShiftedWindowAttention",
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2":
        "robust_surgery.nn.swin:ModuleCallingShiftedWindowAttentionV2",
    "timm.models.beit.Attention": "robust_surgery.nn.timm_attention:ModuleCallingBeitAttention",
    "timm.models.eva.EvaAttention": "robust_surgery.nn.timm_attention:ModuleCallingEvaAttention",
    "timm.models.swin_transformer_v2.WindowAttention":
        "robust_surgery.nn.timm_attention:ModuleCallingSwinV2WindowAttention",
}
# Subclasses that override ``forward`` with exactly their base's computation: converted as the base.
EQUIVALENT_SUBCLASSES: set[str] = {
    "timm.layers.linear.Linear",  # casts weights to the input dtype under TorchScript only
}


def _type_path(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _equivalent_base(t: type) -> type | None:
    """The registered base type a subclass converts as: one whose ``forward`` it does not override."""
    for base in t.__mro__[1:]:
        if base in _CONVERTERS and (getattr(t, "forward", None) is getattr(base, "forward", None)
                                    or _type_path(t) in EQUIVALENT_SUBCLASSES):
            return base
    return None


def converter_for(module: nn.Module) -> tuple[Converter | None, type | None]:
    """(converter, the type it was registered for) that turns ``module`` into its NRPM layer;
    (None, None) when there is none. Library layers (:data:`LIBRARY_LAYERS`) register on first sight."""
    t = type(module)
    if isinstance(module, NRPMLayer):
        return None, None
    if t not in _CONVERTERS and _type_path(t) in LIBRARY_LAYERS:
        register_converter(t)(_builtin(_import_path(LIBRARY_LAYERS[_type_path(t)])))
    if t in _CONVERTERS:
        return _CONVERTERS[t], t
    base = _equivalent_base(t)
    return (_CONVERTERS[base], base) if base is not None else (None, None)


_LINEAR_LIKE = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase)
_LIKE_NAME = re.compile(r"Linear|Conv|Attention|Proj|Dense|LSTM|GRU|RNN")
# 2-D parameters that are tables added to scores, not weights matched with the input: attention
# biases and relative-position tables (LeViT's attention_biases, Swin's relative_position_bias_table,
# MViT-v2's rel_pos_h)
_TABLE_NAME = re.compile(r"bias|pos", re.IGNORECASE)


def _import_path(where: str) -> type:
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


def _calls_children(module: nn.Module) -> bool:
    """True for a weight-reading parent (:data:`WEIGHT_READING_PARENTS`) or its switched class: its
    pattern matches are its children's, converted as layers of their own."""
    return hasattr(type(module), "calls_children_of") or _type_path(type(module)) in WEIGHT_READING_PARENTS


def _route_through_children(model: nn.Module) -> None:
    """Switch every weight-reading parent with an NRPM child to the class that calls its children."""
    for m in model.modules():
        where = WEIGHT_READING_PARENTS.get(_type_path(type(m)))
        if where and any(isinstance(c, NRPMLayer) for c in m.children()):
            routed = _import_path(where)
            if getattr(routed, "can_route", lambda _: True)(m):
                m.__class__ = routed


def _linear_like(module: nn.Module) -> bool:
    """A module that computes a pattern match of its own: a Linear/Conv/attention/recurrent layer,
    a library layer we know, or a class so named with a weight matrix of its own (not a bias or
    position table)."""
    if isinstance(module, NRPMLayer) or _calls_children(module):
        return False
    if isinstance(module, _LINEAR_LIKE) or type(module) in _CONVERTERS or _type_path(type(module)) in LIBRARY_LAYERS:
        return True
    own = [p for name, p in module.named_parameters(recurse=False) if p.dim() >= 2 and not _TABLE_NAME.search(name)]
    return bool(own) and _LIKE_NAME.search(type(module).__name__) is not None


def _no_converter_reason(module: nn.Module) -> str:
    t = type(module)
    for base in t.__mro__[1:]:
        if base in _CONVERTERS:
            return (f"no converter: a {base.__name__} subclass with a forward of its own; register one with "
                    f"@robust_surgery.register_converter({t.__name__})")
    return f"no converter for {t.__name__}; register one with @robust_surgery.register_converter({t.__name__})"


def skipped_layers(model: nn.Module) -> list[dict]:
    """Every Linear/Conv-like module of ``model`` that is not an NRPM layer, as
    ``{"name", "type", "reason"}``: the reason ``convert`` recorded (excluded, not included,
    filter_fn, an override of None), else why it cannot be converted (no converter)."""
    recorded = {row["name"]: row["reason"] for row in get_meta(model).get("skipped") or []}
    rows = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or not _linear_like(module):
            continue
        reason = recorded.get(name)
        if reason is None:
            reason = "not converted" if converter_for(module)[0] is not None else _no_converter_reason(module)
        rows.append({"name": name, "type": type(module).__name__, "reason": reason})
    return rows


def group_skipped(rows: list[dict]) -> list[dict]:
    """Skipped rows grouped by (type, reason): ``{"type", "reason", "count", "names"}``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        groups.setdefault((row["type"], row["reason"]), []).append(row["name"])
    return [{"type": t, "reason": r, "count": len(names), "names": names} for (t, r), names in groups.items()]


def _builtin(nrpm_type: type) -> Converter:
    def fn(module: nn.Module, cfg: LayerConfig) -> nn.Module:
        return nrpm_type.from_dense(module, cfg.settings, cfg.lam, cfg.memory_budget)

    return fn


for _nrpm in (NRPMLinear, NRPMConv1d, NRPMConv2d, NRPMConv3d, NRPMMultiheadAttention):
    register_converter(_nrpm.dense_type)(_builtin(_nrpm))


# --------------------------------------------------------------------------------------------
# Selection by name
# --------------------------------------------------------------------------------------------
def _pattern_matches(pattern: str, fqn: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(fqn, pattern)
    return pattern == fqn


def _as_patterns(value, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [p for p in value.split(",") if p.strip()]
    elif not isinstance(value, Iterable) or not all(isinstance(p, str) for p in value):
        raise InvalidTypeError(f"{name} takes layer names or patterns: a string ('fc1,layer1.*') or a list of strings, "
                        f"got {value!r}")
    patterns = [p.strip() for p in value]
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise InvalidInputError(f"{name} pattern {p!r} is not a valid regular expression: {e}") from None
    return patterns


_SETTING_KEYS = set(LAYER_SETTING_NAMES)


def _layer_config(fqn: str, base: LayerConfig, overrides: Mapping[str, Mapping] | None) -> LayerConfig | None:
    """The config of one layer: the exact-name override wins, else the first matching pattern.

    An override value of ``None`` leaves the layer unconverted.
    """
    if not overrides:
        return base
    chosen = overrides[fqn] if fqn in overrides else None
    if fqn not in overrides:
        for pattern, value in overrides.items():
            if _pattern_matches(pattern, fqn):
                chosen = value
                break
        else:
            return base
    if chosen is None:
        return None
    unknown = set(chosen) - _SETTING_KEYS
    if unknown:
        raise InvalidInputError(f"override for {fqn!r} has unknown keys {sorted(unknown)}; allowed: {sorted(_SETTING_KEYS)}")
    lam = chosen.get("lam", base.lam)
    settings = replace(base.settings, **{k: v for k, v in chosen.items() if k != "lam"})
    return LayerConfig(settings, _check_lam(lam), base.memory_budget)


def _check_lam(lam) -> float:
    """λ as a float in [0, 1]; a clear error for NaN, values outside, and non-numbers (True, '0.5')."""
    if isinstance(lam, (bool, str, bytes)) or lam is None:
        raise InvalidTypeError(f"lam (λ) must be a number in [0, 1], got {lam!r} (a {type(lam).__name__})")
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise InvalidInputError(f"lam (λ) must be a number in [0, 1], got {lam!r}") from None
    if not 0.0 <= lam <= 1.0:
        raise InvalidInputError(f"lam (λ) must be in [0, 1] (1 = the original layer, 0 = pure NRPM), got {lam}")
    return lam


# --------------------------------------------------------------------------------------------
# Walking and replacing
# --------------------------------------------------------------------------------------------
def _replace_child(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = new


def nrpm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every NRPM layer in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NRPMLayer)]


def is_converted(model: nn.Module) -> bool:
    """True when ``model`` holds at least one NRPM layer."""
    return any(isinstance(m, NRPMLayer) for m in model.modules())


def _check_paradigm(paradigm) -> int:
    if paradigm not in PARADIGMS:
        raise InvalidInputError(f"paradigm must be 1, 2 or 3 ({'; '.join(f'{k}: {v}' for k, v in PARADIGMS.items())}), got {paradigm!r}")
    return int(paradigm)


def apply_paradigm(model: nn.Module, paradigm: int) -> nn.Module:
    """Set which parameters train: 1 leaves them as they are, 2 only λ, 3 everything.

    A λ of exactly 0 or 1 (logit ±∞) stays frozen in paradigms 2 and 3: its gradient is exactly
    zero, and weight decay would turn it into NaN. Classical adversarial training is paradigm 3 at
    λ = 1 for this reason: only the ordinary weights move.
    """
    paradigm = _check_paradigm(paradigm)
    if paradigm in (2, 3):
        for name, p in model.named_parameters():
            if name.endswith("lam_logit"):
                p.requires_grad_(bool(torch.isfinite(p).all()))
            else:
                p.requires_grad_(paradigm == 3)
    set_meta(model, paradigm=paradigm)
    return model


def convert(
    model: nn.Module,
    paradigm: int = 1,
    *,
    norm: str = DEFAULTS.norm,
    K: int = DEFAULTS.K,
    eps: float = DEFAULTS.eps,
    lam: float = DEFAULT_LAM,
    gamma: float = DEFAULTS.gamma,
    delta: float = DEFAULTS.delta,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    overrides: Mapping[str, Mapping | None] | None = None,
    types: Iterable[type] | None = None,
    memory_budget: int | None = None,
    inplace: bool = False,
    recalibrate: int = 0,
    recalibrate_data=None,
    data_root=None,
) -> nn.Module:
    """Replace the Linear/Conv layers of ``model`` by NRPM layers; return the converted model.

    Selection: a layer of a convertible type (``types``, default every registered type) is
    converted when its fully qualified name matches ``include`` (exact name, glob such as
    ``"layer1.*"``, or ``"re:<regex>"``; default: all), matches no ``exclude`` pattern, and
    ``filter_fn(module, name)`` (if given) returns True. ``overrides`` maps a name or pattern to
    per-layer settings (``{"fc3": {"lam": 1.0}}``; ``None`` skips the layer); an exact name wins
    over patterns, else the first matching pattern. ``paradigm`` 2 marks only λ trainable, 3
    everything (training itself is :func:`robust_surgery.finetune`). ``inplace=False`` leaves
    ``model`` untouched. ``recalibrate=N`` then re-estimates every BatchNorm's running statistics
    on N clean batches of ``recalibrate_data`` (a training set name, path or images; see
    :func:`robust_surgery.surgery.recalibrate.recalibrate_batchnorm`), recorded in the manifest. Raises
    :class:`NoLayerMatchedError` when nothing is selected.
    """
    if not isinstance(model, nn.Module):
        hint = (f"; load it first: robust_surgery.convert(robust_surgery.load_model({model!r}), ...)"
                if isinstance(model, str) else "")
        raise InvalidTypeError(f"convert takes an nn.Module, got a {type(model).__name__}{hint}")
    paradigm = _check_paradigm(paradigm)
    if recalibrate and recalibrate_data is None:
        raise InvalidInputError("recalibrate=N needs the clean training data to run: recalibrate_data='cifar10' (CLI: --data)")
    base = LayerConfig(NRPMSettings(norm=norm, K=K, eps=eps, gamma=gamma, delta=delta), _check_lam(lam), memory_budget)
    include_p = _as_patterns(include, "include")
    exclude_p = _as_patterns(exclude, "exclude") or []
    if overrides is not None and not isinstance(overrides, Mapping):
        raise InvalidTypeError(f"overrides must be a mapping of layer name/pattern to settings, got {type(overrides).__name__}")
    wanted = tuple(types) if types is not None else None
    for t in wanted or ():
        if t not in _CONVERTERS and _type_path(t) not in LIBRARY_LAYERS:
            raise InvalidInputError(f"no converter registered for {t.__name__}; add one with @robust_surgery.register_converter({t.__name__})")

    if not inplace:
        model = copy.deepcopy(model)

    skipped: list[dict] = []  # {"name", "type", "reason"} of every Linear/Conv-like layer left as it is
    candidates = []
    for n, m in model.named_modules(remove_duplicate=False):
        if not n:
            continue
        conv, registered = converter_for(m)
        if conv is not None and (wanted is None or registered in wanted or type(m) in wanted):
            candidates.append((n, m))
        elif _linear_like(m):
            reason = (f"not among types={[t.__name__ for t in wanted]}" if conv is not None
                      else _no_converter_reason(m))
            skipped.append({"name": n, "type": type(m).__name__, "reason": reason})
    if overrides:
        for pattern in overrides:
            if not isinstance(pattern, str):
                raise InvalidTypeError(f"overrides keys are layer names or patterns (strings), got {pattern!r}")
            if not any(_pattern_matches(pattern, n) for n, _ in candidates):
                names = ", ".join(n for n, _ in candidates[:20]) or "none"
                raise InvalidInputError(f"override {pattern!r} names no convertible layer of this model (layers: {names}); "
                                 "check the name (exact, glob like 'layer1.*', or 're:<regex>')")
    include_hits = {p: 0 for p in include_p or []}
    plan: list[tuple[str, nn.Module, LayerConfig]] = []
    for fqn, module in candidates:
        why = None
        if include_p is not None:
            hits = [p for p in include_p if _pattern_matches(p, fqn)]
            for p in hits:
                include_hits[p] += 1
            if not hits:
                why = "not included (include=)"
        if why is None and any(_pattern_matches(p, fqn) for p in exclude_p):
            why = "excluded (exclude=)"
        if why is None and filter_fn is not None and not filter_fn(module, fqn):
            why = "filter_fn returned False"
        cfg = _layer_config(fqn, base, overrides) if why is None else None
        if why is None and cfg is None:
            why = "override None (left as it is)"
        if why is None:
            plan.append((fqn, module, cfg))
        else:
            skipped.append({"name": fqn, "type": type(module).__name__, "reason": why})

    if not plan:
        names = [n for n, _ in candidates]
        shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
        already = [n for n, _ in nrpm_layers(model)]
        if not names and already:
            raise NoLayerMatchedError(
                f"the model is already converted ({len(already)} NRPM layer{'s' if len(already) != 1 else ''}: "
                f"{', '.join(already[:5])}{', …' if len(already) > 5 else ''}); convert the original network "
                "instead, or fine-tune this one (surgery finetune / robust_surgery.finetune)")
        given = [f"{k}={v}" for k, v in (("include", include_p), ("exclude", exclude_p or None),
                                         ("filter_fn", "set" if filter_fn else None),
                                         ("types", [t.__name__ for t in types] if types is not None else None))
                 if v is not None]
        if overrides and all(v is None for v in overrides.values()):
            given.append("overrides skip every matched layer")
        why = f" with {', '.join(given)}" if given else ""
        raise NoLayerMatchedError(
            f"no layer was selected{why}. "
            + (f"Convertible layers in this model: {shown}. Check the names (exact, glob like 'layer1.*', or 're:<regex>')."
               if names else f"This model has no layer of a convertible type ({', '.join(t.__name__ for t in wanted or convertible_types())}); "
               "register a converter for its layer types with @robust_surgery.register_converter.")
        )
    for p, count in include_hits.items():
        if count == 0:
            warnings.warn(f"include pattern {p!r} matched no layer", stacklevel=2)
    planned = [fqn for fqn, _, _ in plan]
    for pattern in overrides or {}:
        if not any(_pattern_matches(pattern, n) for n in planned):
            warnings.warn(f"override {pattern!r} matches no selected layer (include/exclude/filter_fn leave out every "
                          "layer it names); it has no effect", stacklevel=2)
    missing = [row for row in skipped if row["reason"].startswith("no converter")]
    if missing:
        groups = "; ".join(f"{g['count']} × {g['type']} ({', '.join(g['names'][:3])}{', …' if g['count'] > 3 else ''})"
                           for g in group_skipped(missing))
        warnings.warn(f"convert: {len(missing)} Linear/Conv-like layer{'s' if len(missing) != 1 else ''} left unconverted, "
                      f"no converter for the type: {groups}. Register one with "
                      "@robust_surgery.register_converter(LayerType) to convert them", stacklevel=2)

    converted: dict[int, nn.Module] = {}  # shared modules are converted once and stay shared
    for fqn, module, cfg in plan:
        new = converted.get(id(module))
        if new is None:
            new = converter_for(module)[0](module, cfg)
            converted[id(module)] = new
        _replace_child(model, fqn, new)
    _route_through_children(model)
    set_meta(model, skipped=skipped)
    if recalibrate:
        from robust_surgery.surgery.recalibrate import recalibrate_batchnorm

        recalibrate_batchnorm(model, recalibrate_data, recalibrate, data_root=data_root)
    return apply_paradigm(model, paradigm)


def unconvert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every NRPM layer by its plain layer (same weight and bias tensors; λ dropped) and switch
    every weight-reading parent (:data:`WEIGHT_READING_PARENTS`) back to its own class."""
    if not inplace:
        model = copy.deepcopy(model)
    done: dict[int, nn.Module] = {}
    layers = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and isinstance(m, NRPMLayer)]
    for fqn, layer in layers:
        if id(layer) not in done:
            done[id(layer)] = layer.to_dense()
        _replace_child(model, fqn, done[id(layer)])
    for m in model.modules():
        if hasattr(type(m), "calls_children_of"):
            m.__class__ = type(m).calls_children_of
    if isinstance(model, NRPMLayer):
        model = model.to_dense()
    meta = get_meta(model)
    meta.pop("paradigm", None)
    meta.pop("skipped", None)
    return model


def set_lam(model: nn.Module, lam: float, include: str | Iterable[str] | None = None) -> nn.Module:
    """Set λ of every NRPM layer (or those whose name matches ``include``) in place."""
    lam = _check_lam(lam)
    patterns = _as_patterns(include, "include")
    for name, layer in nrpm_layers(model):
        if patterns is None or any(_pattern_matches(p, name) for p in patterns):
            layer.set_lam(lam)
    return model
