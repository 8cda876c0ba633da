"""Where a model runs and in what precision: the ``--device`` and ``--amp`` words, resolved once."""
from __future__ import annotations

import contextlib
import os

import torch

from robust_surgery.errors import InvalidInputError

__all__ = ["AMP", "resolve_device", "resolve_amp", "amp_name", "autocast"]

#: ``--amp`` words: autocast's dtype (None: full float32)
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else the CPU;
    ``cpu``; ``cuda`` / ``cuda:N`` (an error naming the fix when there is no such GPU)."""
    if isinstance(spec, torch.device):
        return spec
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        text = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InvalidInputError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {spec}: no CUDA device is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA devices here")
    elif device.type != "cpu":
        raise InvalidInputError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return device


def resolve_amp(spec: str | torch.dtype | None) -> torch.dtype | None:
    """``none``/None (float32), ``bf16`` or ``fp16`` → autocast's dtype. NRPM layers compute their
    robust estimate in float32 inside autocast (its sums overflow half precision), see docs/design.md."""
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    key = str(spec).strip().lower()
    if key not in AMP:
        raise InvalidInputError(f"--amp must be one of {', '.join(AMP)}, got {spec!r}")
    return AMP[key]


def amp_name(spec: str | torch.dtype | None) -> str | None:
    """The ``--amp`` word a config records: None for full float32, else ``bf16``/``fp16``."""
    dtype = resolve_amp(spec)
    return next((k for k, v in AMP.items() if v is dtype), None) if dtype is not None else None


def autocast(device: str | torch.device, amp: str | torch.dtype | None):
    """The context a model's forward runs in: ``torch.autocast`` on ``device``'s type for ``amp``
    (``bf16``/``fp16``), nothing for float32 (None/``none``)."""
    dtype = resolve_amp(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
