"""What a resumable run is bound to: a record of every setting that changes its numbers.

An evaluation state (``--state``) and a fine-tuning checkpoint (``--checkpoint-dir``) store the
record of the run that wrote them: digests of the model's weights and of the data, the model's
NRPM settings layer by layer, and every attack or training setting. A rerun compares its own
record with the stored one field by field and refuses (:class:`StateMismatchError`) on the first
difference, naming the field and both values, so no run silently reuses another run's results.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from robust_surgery._json import strict
from robust_surgery.errors import StateMismatchError

__all__ = ["tensor_digest", "state_digest", "nrpm_settings", "check_record", "read_resume_file", "pack_record",
           "resume_file", "RECORD_VERSION"]

RECORD_VERSION = 2


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 over the dtypes, shapes and bytes of ``tensors``, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    """SHA-256 over a module's state_dict (names and bytes): equal digests = identical weights and buffers."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(tensor_digest(v).encode())
    return h.hexdigest()


def nrpm_settings(model: nn.Module) -> dict[str, dict]:
    """Per NRPM layer: its type, reweighting settings (norm, K, ε, γ, δ) and λ."""
    from robust_surgery.nn.layers import NRPMLayer

    return {name: {"type": type(m).__name__, **m.settings.to_dict(), "lam": m.lam_value}
            for name, m in model.named_modules() if isinstance(m, NRPMLayer)}


def _first_difference(saved: Any, now: Any, where: str) -> tuple[str, Any, Any] | None:
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in list(saved) + [k for k in now if k not in saved]:
            if k not in saved or k not in now:
                return f"{where}.{k}" if where else k, saved.get(k, "(absent)"), now.get(k, "(absent)")
            diff = _first_difference(saved[k], now[k], f"{where}.{k}" if where else k)
            if diff:
                return diff
        return None
    if isinstance(saved, list) and isinstance(now, list):
        if len(saved) != len(now):
            return f"{where} (count)", len(saved), len(now)
        for i, (a, b) in enumerate(zip(saved, now)):
            label = a.get("key", i) if isinstance(a, dict) else i
            diff = _first_difference(a, b, f"{where}[{label}]")
            if diff:
                return diff
        return None
    return None if saved == now else (where, saved, now)


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:16] + "…"


def check_record(saved: Mapping | None, now: Mapping, path: str | os.PathLike, what: str, fix: str) -> None:
    """Refuse unless ``saved`` (the record in ``path``) equals ``now``; the message names the first field that differs."""
    now = strict(dict(now))
    if saved is None or saved.get("version") != RECORD_VERSION:
        raise StateMismatchError(f"{what} {path} was written by an older version of robust-surgery and records "
                                 f"too little to be checked against this run; {fix}")
    diff = _first_difference(strict(dict(saved)), now, "")
    if diff:
        field, a, b = diff
        raise StateMismatchError(f"{what} {path} belongs to another run: its {field} is {_short(a)}, this run's is "
                                 f"{_short(b)}; {fix}")


def read_resume_file(path: str | os.PathLike, what: str, fix: str) -> dict:
    """``torch.load`` (weights only) of a state or checkpoint file, with clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        raise StateMismatchError(f"{what} {path} is a folder; give a file path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StateMismatchError(f"{what} {path} is not a file robust-surgery wrote (unreadable: "
                                 f"{type(e).__name__}); {fix}") from None
    if not isinstance(obj, dict):
        raise StateMismatchError(f"{what} {path} is not a file robust-surgery wrote (it holds a "
                                 f"{type(obj).__name__}); {fix}")
    return obj


def pack_record(record: Mapping) -> str:
    """The record as the strict JSON text a state or checkpoint file stores (under ``"record"``)."""
    return json.dumps(strict(dict(record)))


def resume_file(path: str | os.PathLike, record: Mapping, what: str, fix: str) -> dict:
    """Read the state or checkpoint at ``path`` and return it if it was written by a run with ``record``.

    Refuses (:class:`StateMismatchError`, naming the field) a file of another run, of an older
    version, or one that is not ours.
    """
    saved = read_resume_file(path, what, fix)
    if "record" not in saved:
        looks = " (it holds tensors by name: a model's weights?)" if saved and all(
            torch.is_tensor(v) for v in saved.values()) else ""
        raise StateMismatchError(f"{what} {path} is not a {what} robust-surgery wrote: it has no run record{looks}; "
                                 f"{fix}")
    try:
        saved_record = json.loads(saved["record"]) if "record" in saved else None
    except (TypeError, ValueError):
        saved_record = {}
    check_record(saved_record, record, path, what, fix)
    return saved
