"""Loading models from files or specs, and saving converted models with their manifest.

Architecture specs: ``zoo:NAME`` (our model zoo), ``torchvision:NAME``, ``timm:NAME``, or
``package.module:Callable`` (called with no arguments). A saved model is one ``.safetensors``
file whose metadata holds a JSON manifest (architecture, paradigm, per-layer NRPM settings,
source hash, package version), so :func:`load` rebuilds it from the file alone.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .fileutil import atomic_path, file_sha256
from .meta import get_meta, set_meta
from .nn.layers import NRPMLayer
from .surgery import apply_paradigm, convert

__all__ = [
    "ModelLoadError",
    "build_arch",
    "load_model",
    "load",
    "save",
    "read_manifest",
    "file_sha256",
    "atomic_path",
    "MANIFEST_KEY",
]

MANIFEST_KEY = "robust_surgery"
FORMAT = "robust-surgery/1"
_SPEC_PREFIXES = ("zoo:", "torchvision:", "timm:")
_ARCH_HELP = "--arch zoo:NAME | torchvision:NAME | timm:NAME | package.module:Callable (Python: arch=...)"


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what was wrong and how to fix it."""


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------
def is_spec(text: str) -> bool:
    """True when ``text`` names a model spec rather than a file (``zoo:``, ``torchvision:``, ``timm:``)."""
    return isinstance(text, str) and text.startswith(_SPEC_PREFIXES)


def build_arch(spec: str, *, pretrained: bool = False, data_root: str | None = None,
               kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the module named by an architecture spec; ``pretrained`` also loads its weights.

    ``kwargs`` go to a ``package.module:Callable`` factory (JSON-able values only: they are
    recorded in the manifest as ``arch_kwargs`` so :func:`load` can call the factory again).
    """
    if kwargs and not (isinstance(spec, str) and not spec.startswith(_SPEC_PREFIXES)):
        raise ModelLoadError(f"architecture keyword arguments only apply to package.module:Callable specs, not {spec!r}")
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelLoadError(f"architecture spec {spec!r} not understood; use {_ARCH_HELP}")
    kind, _, name = spec.partition(":")
    try:
        if kind == "zoo":
            from .zoo import create_model

            model = create_model(name, pretrained=pretrained, data_root=data_root)
        elif kind == "torchvision":
            import torchvision

            if name not in torchvision.models.list_models():
                raise ModelLoadError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
            try:
                model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
            except (OSError, RuntimeError) as e:  # offline download
                raise ModelLoadError(
                    f"could not fetch torchvision's pretrained weights for {name!r} ({type(e).__name__}: {e}). "
                    f"Offline? Pass a weights file instead: surgery convert {name}.pth --arch torchvision:{name}"
                ) from None
        elif kind == "timm":
            import timm

            if not timm.list_models(name) and not timm.is_model(name):
                raise ModelLoadError(f"timm has no model {name!r}; see timm.list_models('*pattern*')")
            try:
                model = timm.create_model(name, pretrained=pretrained)
            except (OSError, RuntimeError) as e:
                raise ModelLoadError(
                    f"could not fetch timm's pretrained weights for {name!r} ({type(e).__name__}: {e}). "
                    f"Offline? Pass a weights file instead: surgery convert {name}.safetensors --arch timm:{name}"
                ) from None
        else:
            try:
                module = importlib.import_module(kind)
            except ImportError as e:
                raise ModelLoadError(f"cannot import {kind!r} for architecture {spec!r}: {e}") from None
            factory = getattr(module, name, None)
            if not callable(factory):
                raise ModelLoadError(f"{kind} has no callable {name!r} (architecture spec {spec!r})")
            model = factory(**dict(kwargs or {}))
            if not isinstance(model, nn.Module):
                raise ModelLoadError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    except ModelLoadError:
        raise
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ModelLoadError(str(e.args[0]) if e.args else str(e)) from None
    set_meta(model, arch=spec)
    if kwargs:
        set_meta(model, arch_kwargs=dict(kwargs))
    return model


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
_PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
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


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise ModelLoadError(
                f"{path} contains pickled Python objects (a whole module, or custom classes), which can run "
                "arbitrary code when loaded, so it was refused (torch.load weights_only=True). If you trust "
                "where the file came from, pass --trust-pickle (Python: trust_pickle=True); better, re-save it "
                f"as a state_dict. Detail: {str(e).splitlines()[0]}"
            ) from None
    except Exception as e:  # torch raises many types (KeyError, RuntimeError...) for a non-torch file
        raise ModelLoadError(f"{path} is not a readable PyTorch file ({type(e).__name__}: {e})") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool, where: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if bad:
        k = bad[0]
        raise ModelLoadError(
            f"weights in {where} do not fit the architecture: {k} has shape {tuple(sd[k].shape)}, "
            f"the model wants {tuple(own[k].shape)} ({len(bad)} such tensors). Is --arch right?"
        )
    if strict and (missing or unexpected):
        raise ModelLoadError(
            f"weights in {where} do not match the architecture: {len(missing)} missing "
            f"({', '.join(missing[:5])}{'…' if len(missing) > 5 else ''}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:5])}{'…' if len(unexpected) > 5 else ''}). Check --arch, or pass "
            "--non-strict (Python: strict=False) to load what matches."
        )
    model.load_state_dict(sd, strict=False)


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The robust-surgery manifest stored in a ``.safetensors`` file, or None if it has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from None
    text = meta.get(MANIFEST_KEY)
    return json.loads(text) if text else None


def _rebuild(manifest: dict, path: Path, arch: str | None, data_root: str | None) -> nn.Module:
    from safetensors.torch import load_model as st_load_model

    spec = arch or manifest.get("arch")
    if not spec:
        raise ModelLoadError(f"{path} records no architecture; pass one with {_ARCH_HELP}")
    kwargs = manifest.get("arch_kwargs") if not arch else None
    model = build_arch(spec, pretrained=False, data_root=data_root, kwargs=kwargs)
    layers: dict[str, dict] = manifest.get("layers") or {}
    if layers:
        overrides = {name: {k: v for k, v in cfg.items() if k in ("norm", "K", "eps", "gamma", "delta", "lam")}
                     for name, cfg in layers.items()}
        model = convert(model, include=list(layers), overrides=overrides, inplace=True)
        for name, cfg in layers.items():
            got = type(model.get_submodule(name)).__name__
            if cfg.get("type") and got != cfg["type"]:
                raise ModelLoadError(f"{path}: layer {name} rebuilt as {got}, the file says {cfg['type']} "
                                     "(is the converter for it registered/imported?)")
    missing, unexpected = st_load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{path} does not match its recorded architecture {spec}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    set_meta(model, **{k: manifest[k] for k in ("arch", "arch_kwargs", "source", "training") if manifest.get(k) is not None})
    if manifest.get("paradigm"):
        apply_paradigm(model, manifest["paradigm"])
    get_meta(model)["manifest"] = manifest
    return model.eval()


def load_model(
    source: str | os.PathLike,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    data_root: str | None = None,
) -> nn.Module:
    """Load a model from a spec (``zoo:mnist-mlp``, ``torchvision:resnet18``...) or a file.

    Files: our ``.safetensors`` (rebuilt from its manifest; no ``arch`` needed), a plain
    ``.safetensors`` or ``.pt``/``.pth``/``.th`` state_dict (needs ``arch``), or a whole pickled
    module (only with ``trust_pickle=True``). Returns the module in eval mode, its provenance
    (arch, source path and SHA-256) recorded for the manifest of a later save.
    """
    if isinstance(source, str) and is_spec(source) and not Path(source).exists():
        model = build_arch(source, pretrained=True, data_root=data_root)
        set_meta(model, source={"spec": source})
        return model.eval()
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file {path} not found (or give a spec such as zoo:mnist-mlp; `surgery zoo list` lists them)")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder; give a model file (.safetensors, .pt, .pth) or a spec")
    digest = file_sha256(path)
    if path.suffix == ".safetensors":
        manifest = read_manifest(path)
        if manifest is not None:
            model = _rebuild(manifest, path, arch, data_root)
            return model
        from safetensors.torch import load_file

        sd = _extract_state_dict(load_file(str(path)), path)
        obj = None
    else:
        obj = _torch_load(path, trust_pickle)
        sd = None if isinstance(obj, nn.Module) else _extract_state_dict(obj, path)
    if isinstance(obj, nn.Module):
        model = obj
        if arch:
            set_meta(model, arch=arch)
    else:
        if not arch:
            raise ModelLoadError(f"{path} holds only weights (a state_dict); say which architecture they belong to: {_ARCH_HELP}")
        model = build_arch(arch, pretrained=False, data_root=data_root)
        _load_weights(model, sd, strict, str(path))
    set_meta(model, source={"path": str(path), "sha256": digest})
    return model.eval()


def load(path: str | os.PathLike, *, arch: str | None = None, data_root: str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save` (or ``surgery convert``) from the file alone."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_model(path, arch=arch, data_root=data_root)
    if not path.exists():
        raise ModelLoadError(f"model file {path} not found")
    manifest = read_manifest(path)
    if manifest is None:
        return load_model(path, arch=arch, data_root=data_root)
    return _rebuild(manifest, path, arch, data_root)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def _layer_manifest(model: nn.Module) -> dict[str, dict]:
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, NRPMLayer):
            layers[name] = {"type": type(m).__name__, **m.settings.to_dict(), "lam": m.lam_value}
    return layers


def build_manifest(model: nn.Module, **extra) -> dict:
    """The manifest :func:`save` writes: provenance from the model plus ``extra`` fields."""
    meta = get_meta(model)
    manifest = {
        "format": FORMAT,
        "package_version": _version(),
        "torch_version": torch.__version__,
        "arch": meta.get("arch"),
        "arch_kwargs": meta.get("arch_kwargs"),
        "paradigm": meta.get("paradigm"),
        "source": meta.get("source"),
        "training": meta.get("training"),
        "layers": _layer_manifest(model),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.update(extra)
    return manifest


def save(model: nn.Module, path: str | os.PathLike, *, arch: str | None = None, **extra) -> dict:
    """Write ``model`` to one ``.safetensors`` file with its manifest; return the manifest.

    ``arch`` overrides the recorded architecture spec (needed for models built in Python).
    The file is written under a temporary name and renamed, so it is never half-written.
    """
    from safetensors.torch import save_model as st_save_model

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save writes .safetensors files; got {path.name!r} (use a name ending in .safetensors)")
    if arch:
        set_meta(model, arch=arch)
    manifest = build_manifest(model, **extra)
    with atomic_path(path) as tmp:
        st_save_model(model, str(tmp), metadata={MANIFEST_KEY: json.dumps(manifest)})
    return manifest
