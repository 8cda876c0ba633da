"""Recommended NRPM settings per zoo model (like timm's ``pretrained_cfg``, for surgery).

The NRPM release tunes its settings per model (every released script runs K = 1, with ε = 5e-5
for the MLP, 1e-3 for LeNet, 5e-4 for testing ResNets; ``docs/cli.md``, Presets). ε is an absolute threshold on
the product terms, so a value right for one network can make another nearly linear: on the
released MLP, λ = 0.6 and K = 1 give FGSM(0.2) accuracy 19 % with ε = 5e-5 but 3 % with ε = 1e-3.
A preset records what works for a model; ``surgery convert`` uses it for every knob not given
on the command line, and says so. The Python :func:`robust_surgery.convert` never applies a
preset silently: pass ``**preset_for(model)`` to use one.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from robust_surgery.errors import InvalidInputError
from robust_surgery.nn.functional import DEFAULT_LAM, DEFAULTS, LAYER_SETTING_NAMES


_PRESETS: dict[str, dict[str, Any]] = {}
_KEYS = (*LAYER_SETTING_NAMES, "include", "exclude")


def register_preset(zoo_name: str, *, note: str = "", **settings) -> None:
    """Record the recommended :func:`convert` keywords (norm, K, eps, lam, ..., include) for a zoo model."""
    bad = sorted(set(settings) - set(_KEYS))
    if bad:
        raise InvalidInputError(f"preset for {zoo_name!r}: unknown settings {bad}; valid: {', '.join(_KEYS)}")
    _PRESETS[zoo_name] = {**settings, "_note": note}


def preset_for(model: nn.Module) -> dict[str, Any]:
    """The recommended convert keywords for ``model`` (a zoo model), or ``{}`` when it has none."""
    from robust_surgery.io.zoo import _ensure_registered, zoo_name

    _ensure_registered()
    preset = _PRESETS.get(zoo_name(model) or "", {})
    return {k: v for k, v in preset.items() if not k.startswith("_")}


def preset_note(model: nn.Module) -> str:
    """Where the preset of ``model`` comes from (one line), or ``""``."""
    from robust_surgery.io.zoo import zoo_name

    return _PRESETS.get(zoo_name(model) or "", {}).get("_note", "")


def resolve_settings(model: nn.Module, given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """:func:`convert`'s knobs for ``model``: a given value (not None) wins, then the zoo model's
    preset, then the defaults (:data:`~robust_surgery.nn.functional.DEFAULTS`, λ 0.5, every layer).

    ``given`` maps knob names (norm, K, eps, lam, gamma, delta, include, exclude) to values or None.
    Returns the settings and the names of those taken from the preset (to say so).
    """
    bad = sorted(set(given) - set(_KEYS))
    if bad:
        raise InvalidInputError(f"unknown convert settings {bad}; valid: {', '.join(_KEYS)}")
    defaults = {**{k: getattr(DEFAULTS, k) for k in LAYER_SETTING_NAMES if k != "lam"}, "lam": DEFAULT_LAM,
                "include": None, "exclude": None}
    preset = preset_for(model)
    settings, used = {}, []
    for key, value in given.items():
        if value is not None:
            settings[key] = value
        elif key in preset:
            settings[key] = preset[key]
            used.append(key)
        else:
            settings[key] = defaults[key]
    return settings, used


def paradigm_eps(paradigm: int, eps: float | None, nrpm_eps: float | None, train_eps: float | None,
                 default_train_eps: float = 0.2) -> tuple[float | None, float]:
    """What ``surgery convert --eps`` means: the reweighting ε in paradigm 1, the training attack's
    budget in paradigms 2-3 (``--nrpm-eps`` / ``--train-eps`` are the explicit forms).

    Returns ``(nrpm_eps or None for the preset/default, train_eps)``; the same quantity given twice
    is refused.
    """
    if paradigm == 1:
        if eps is not None and nrpm_eps is not None:
            raise InvalidInputError("give the reweighting ε once: --eps or --nrpm-eps")
        nrpm_eps = eps if eps is not None else nrpm_eps
    else:
        if eps is not None and train_eps is not None:
            raise InvalidInputError("in paradigms 2-3 --eps is the training budget; give it once (--eps or --train-eps)")
        train_eps = eps if eps is not None else train_eps
    return nrpm_eps, default_train_eps if train_eps is None else train_eps
