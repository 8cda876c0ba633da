"""Provenance carried on a model object: its architecture spec, source file and paradigm.

Stored as a plain dict attribute so it survives ``copy.deepcopy`` and travels into the
manifest of a saved model (:mod:`robust_surgery.io.model_file`).
"""
from __future__ import annotations

from torch import nn

_ATTR = "_robust_surgery_meta"


def get_meta(model: nn.Module) -> dict:
    """The provenance dict of ``model`` (created empty on first use; mutate it freely)."""
    meta = model.__dict__.get(_ATTR)
    if meta is None:
        meta = {}
        model.__dict__[_ATTR] = meta
    return meta


def set_meta(model: nn.Module, **values) -> nn.Module:
    """Update provenance fields (``arch``, ``source``, ``paradigm``, ``training``...) in place."""
    get_meta(model).update(values)
    return model
