"""Strict JSON for everything robust-surgery writes: no ``NaN``/``Infinity`` tokens, ever.

Python's ``json`` writes non-finite floats as ``NaN``/``Infinity``, which strict parsers
(JavaScript, jq, most languages) reject. Here they become ``null``, tensors and other objects
their plain form, and the result always parses as standard JSON.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["strict", "strict_dumps"]


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, tuples as lists, paths and others as strings."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    try:
        import torch

        if torch.is_tensor(obj):
            return strict(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return strict(obj.item())
        if isinstance(obj, np.ndarray):
            return strict(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def strict_dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`strict` ``(obj)``, refusing NaN (there is none left to refuse)."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)
