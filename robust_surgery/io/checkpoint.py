"""The one checkpoint reader: weights files in, state_dicts out, fitted onto a model with clear errors.

Every loader reads files here: :func:`robust_surgery.io.model_file.load_model` (user files),
the zoo (:mod:`robust_surgery.io.zoo`, registered checkpoints) and R2DL's saved dictionaries.
``.safetensors`` files are read with safetensors; anything else must be a file written by
``torch.save`` and is read with ``weights_only=True``; a file that holds pickled Python objects
is refused unless the user passes the explicit consent flag (``--trust-pickle``).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from robust_surgery.errors import ModelLoadError

__all__ = ["read_checkpoint", "extract_state_dict", "weight_mismatches", "load_weights"]

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
_PREFIXES = ("module.", "_orig_mod.")


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save's zip format, or the legacy pickle format (a pickle protocol byte first)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False, consent_flag: str | None = "--trust-pickle") -> Any:
    """The object stored in ``path``: a dict of tensors for ``.safetensors``, else what ``torch.save``
    wrote (read with ``weights_only=True``). Pickled Python objects load only with
    ``trust_pickle=True``; ``consent_flag`` is the flag the refusal names (None: no flag can
    allow it, e.g. zoo checkpoints). Raises :class:`ModelLoadError` for anything unreadable."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own and OS errors for a damaged file
            raise ModelLoadError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from None
    if not _looks_like_torch_file(path):
        raise ModelLoadError(f"{path} is not a PyTorch file (neither torch.save's zip format nor a pickle); give "
                             "a .pt/.pth written by torch.save or a .safetensors file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ModelLoadError(f"{path} is not a readable PyTorch file (it is corrupt or truncated: "
                                 f"{str(e).splitlines()[0]})") from None
        if not trust_pickle:
            fix = (f"If you trust where the file came from, pass {consent_flag} (Python: trust_pickle=True); better, "
                   "re-save it as a plain state_dict of tensors." if consent_flag else
                   "Re-save it as a plain state_dict of tensors.")
            raise ModelLoadError(
                f"{path} contains pickled Python objects (a whole module, or custom classes), which can run "
                f"arbitrary code when loaded, so it was refused (torch.load weights_only=True). {fix}"
            ) from None
    except Exception as e:  # torch raises many types (KeyError, RuntimeError...) for a damaged file
        raise ModelLoadError(f"{path} is not a readable PyTorch file (it is corrupt or truncated: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"{path} could not be unpickled ({type(e).__name__}: {e})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def extract_state_dict(obj: Any, path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The name → tensor mapping inside a checkpoint object: ``obj[key]`` when ``key`` is given, else
    ``obj`` itself or the first of ``state_dict``/``model_state_dict``/``model``/``net``/``state``
    that is one; a ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix on every
    key is removed."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj or not _is_state_dict(obj[key]):
            raise ModelLoadError(f"{path}: expected a checkpoint dict with a state_dict under key '{key}'")
        sd = dict(obj[key])
    elif _is_state_dict(obj):
        sd = dict(obj)
    else:
        sd = None
        if isinstance(obj, Mapping):
            for k in _NESTED_KEYS:
                if _is_state_dict(obj.get(k)):
                    sd = dict(obj[k])
                    break
        if sd is None:
            raise ModelLoadError(
                f"{path} holds a {type(obj).__name__} that is neither a state_dict nor a dict with one under "
                f"{', '.join(_NESTED_KEYS)}; save the model with torch.save(model.state_dict(), path)"
            )
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def weight_mismatches(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) keys of ``sd`` against ``model.state_dict()``, each sorted."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    bad = sorted(k for k in set(sd) & set(own) if own[k].shape != sd[k].shape)
    return missing, unexpected, bad


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + ("…" if len(keys) > n else "")


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], *, strict: bool, where: str) -> None:
    """Copy ``sd`` into ``model``: any wrong shape is an error; missing or unexpected keys are one when
    ``strict`` (the message says how to load what matches)."""
    missing, unexpected, bad = weight_mismatches(model, sd)
    if bad:
        k = bad[0]
        raise ModelLoadError(f"weights in {where} do not fit the architecture: {k} has shape {tuple(sd[k].shape)}, "
                             f"the model wants {tuple(model.state_dict()[k].shape)} ({len(bad)} such tensors). "
                             "Is --arch right, or does it need constructor arguments (--arch-kwargs "
                             "'{\"num_classes\": 10}', Python: arch_kwargs=)?")
    if strict and (missing or unexpected):
        raise ModelLoadError(
            f"weights in {where} do not match the architecture: {len(missing)} missing ({_some(missing)}), "
            f"{len(unexpected)} unexpected ({_some(unexpected)}). Check --arch, or pass "
            "--non-strict (Python: strict=False) to load what matches."
        )
    model.load_state_dict(sd, strict=False)
