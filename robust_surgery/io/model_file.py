"""Loading models from files or specs, and saving converted models with their manifest.

Architecture specs are :mod:`robust_surgery.io.archspec`'s. A saved model is one ``.safetensors``
file whose metadata holds a JSON manifest (architecture, paradigm, per-layer NRPM settings,
source hash, package version), so :func:`load` rebuilds it from the file alone. Nothing read
from a file chooses code to run: a manifest's architecture resolves through our registries, and
a ``package.module:Callable`` it names needs ``trust_code=True`` (CLI ``--trust-code``).
"""
from __future__ import annotations

import datetime as _dt
import json
import warnings
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_surgery.io.archspec import ARCH_HELP as _ARCH_HELP
from robust_surgery.io.checkpoint import extract_state_dict, load_weights, read_checkpoint
from robust_surgery.io.archspec import build_arch, is_spec, looks_like_factory, reading_file
from robust_surgery.errors import InvalidInputError, InvalidTypeError, ModelLoadError, UntrustedCodeError
from robust_surgery._json import strict_dumps
from robust_surgery._files import atomic_path, check_output_path, file_sha256
from robust_surgery._meta import get_meta, set_meta
from robust_surgery.nn.functional import LAYER_SETTING_NAMES
from robust_surgery.nn.layers import NRPMLayer
from robust_surgery.surgery.convert import apply_paradigm, convert, is_converted, unconvert

__all__ = [
    "ModelLoadError",
    "UntrustedCodeError",
    "build_arch",
    "load_model",
    "load",
    "save",
    "read_manifest",
    "validate_manifest",
    "file_sha256",
    "atomic_path",
    "MANIFEST_KEY",
]

MANIFEST_KEY = "robust_surgery"
FORMAT = "robust-surgery/1"
_OTHER_FORMATS = ("robust-surgery/r2dl/1",)  # our other file kinds, read by their own loaders


def _version() -> str:
    from robust_surgery import __version__

    return __version__


_LAYER_FIELDS = {"type": str, "norm": str, "K": int, "eps": (int, float), "gamma": (int, float),
                 "delta": (int, float), "lam": (int, float)}
_MANIFEST_FIELDS = {"format": str, "package_version": str, "torch_version": str, "arch": str, "arch_kwargs": dict,
                    "paradigm": int, "source": dict, "training": dict, "recalibration": dict, "layers": dict,
                    "created": str}
_TYPE_WORDS = {str: "a string", int: "a whole number", dict: "an object", (int, float): "a number"}


def validate_manifest(manifest: Any, path: str | os.PathLike) -> dict:
    """Check the shape of a manifest read from ``path``; return it or raise :class:`ModelLoadError`.

    The top level must be a JSON object; known fields must have their types (``arch`` a string,
    ``arch_kwargs``/``source``/``training`` objects, ``paradigm`` 1-3, ``layers`` an object of
    per-layer objects with ``norm`` a string, ``K`` a whole number, ``eps``/``gamma``/``delta``/``lam``
    numbers). Unknown fields are kept (newer versions may add some).
    """
    def bad(field: str, want: str, got: Any) -> ModelLoadError:
        return ModelLoadError(f"{path}: the manifest's {field} must be {want}, got {json.dumps(got)[:80]}; "
                              "the file is damaged or was not written by robust-surgery (re-save it)")

    if not isinstance(manifest, dict):
        raise bad("top level", "a JSON object", manifest)
    for key, typ in _MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if value is None:
            continue
        if not isinstance(value, typ) or isinstance(value, bool):
            raise bad(f"'{key}'", _TYPE_WORDS[typ], value)
    if manifest.get("paradigm") is not None and manifest["paradigm"] not in (1, 2, 3):
        raise bad("'paradigm'", "1, 2 or 3", manifest["paradigm"])
    for name, cfg in (manifest.get("layers") or {}).items():
        if not isinstance(cfg, dict):
            raise bad(f"layer '{name}'", "an object of NRPM settings", cfg)
        for key, typ in _LAYER_FIELDS.items():
            value = cfg.get(key)
            if value is not None and (not isinstance(value, typ) or isinstance(value, bool)):
                raise bad(f"layer '{name}' {key}", _TYPE_WORDS[typ], value)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The robust-surgery manifest stored in a ``.safetensors`` file, or None if it has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from None
    text = meta.get(MANIFEST_KEY)
    if not text:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: the manifest is not valid JSON ({e}); the file is damaged or was not "
                             "written by robust-surgery (re-save it)") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: the manifest is nested too deeply to be one of ours; the file is damaged or "
                             "crafted (re-save the model)") from None
    if isinstance(manifest, dict) and manifest.get("format") not in (None, FORMAT):
        if manifest.get("format") in _OTHER_FORMATS:
            return manifest  # another of our formats (an R2DL result): its reader checks its own fields
        raise ModelLoadError(f"{path}: its manifest says format {manifest.get('format')!r}, which this version does not "
                             f"read (it reads {FORMAT}); a newer robust-surgery wrote it: upgrade, or re-save the model "
                             "with this version")
    return validate_manifest(manifest, path)


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _dtype_kind(stored: str) -> str:
    return "floating point" if stored in _FLOAT_DTYPES else ("bool" if stored == "BOOL" else "integer")


def _check_tensor_shapes(model: nn.Module, path: Path, spec: str) -> None:
    """Name the first tensor of ``path`` whose shape or kind of dtype (floating point, integer, bool)
    does not fit ``model`` (before loading anything): an int64 or bool weight would load and compute
    silently wrong numbers."""
    from safetensors import safe_open

    own = model.state_dict()
    given = spec.startswith("the given ")
    wanter = spec if given else f"its recorded architecture {spec}"
    cause = ("the given network is not the one the file was converted from" if given
             else "the file's tensors do not fit its manifest (damaged or edited file)")
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key in own:
                stored = f.get_slice(key).get_dtype()
                want = "floating point" if own[key].is_floating_point() else ("bool" if own[key].dtype == torch.bool else "integer")
                if _dtype_kind(stored) != want:
                    raise ModelLoadError(
                        f"{path}: tensor {key} is stored as {stored} ({_dtype_kind(stored)}), but {spec} wants a "
                        f"{want} tensor ({str(own[key].dtype).replace('torch.', '')}); the file is damaged or edited")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(own[key].shape):
                    raise ModelLoadError(f"{path}: tensor {key} has shape {shape}, but {wanter} wants "
                                         f"{tuple(own[key].shape)}; {cause}")


def _rebuild(manifest: dict, path: Path, arch: str | None, data_root: str | None, trust_code: bool) -> nn.Module:
    if arch and manifest.get("arch") and arch != manifest["arch"]:
        raise ModelLoadError(
            f"{path} records its own architecture ({manifest['arch']}); --arch {arch} (Python: arch=) is only for "
            "weights-only files. Drop --arch to load it as saved")
    spec = manifest.get("arch") or arch
    if not spec:
        raise ModelLoadError(f"{path} records no architecture; pass one with {_ARCH_HELP}")
    kwargs = manifest.get("arch_kwargs")
    if manifest.get("arch"):
        # the manifest's spec is the file's word; an --arch naming the same factory is the user's consent
        with reading_file(trust_code or arch == manifest["arch"], path):
            model = build_arch(spec, pretrained=False, data_root=data_root, kwargs=kwargs)
    else:  # the user named the architecture of a file that records none
        model = build_arch(spec, pretrained=False, data_root=data_root, kwargs=kwargs)
    return _apply_manifest(model, manifest, path, spec)


def _apply_manifest(model: nn.Module, manifest: dict, path: Path, spec: str) -> nn.Module:
    """Rebuild on the plain ``model`` the NRPM layers ``manifest`` records (each with its settings),
    load the file's tensors strictly (a mismatch names the tensor), restore provenance and the
    paradigm. ``spec``: what the model is, for messages. Returns the model in eval mode."""
    from safetensors.torch import load_model as st_load_model

    if is_converted(model):
        # an architecture that comes converted (a hardened zoo entry such as zoo:mnist-lenet-p3):
        # back to its plain layers, so the manifest's layers convert it exactly as it was saved
        model = unconvert(model, inplace=True)
    layers: dict[str, dict] = manifest.get("layers") or {}
    if layers:
        unknown = [name for name in layers if not _has_submodule(model, name)]
        if unknown:
            raise ModelLoadError(f"{path}: the manifest lists NRPM layer {unknown[0]!r}, which {spec} does not have; "
                                 "the file is damaged or its architecture changed")
        overrides = {name: {k: v for k, v in cfg.items() if k in LAYER_SETTING_NAMES}
                     for name, cfg in layers.items()}
        try:
            model = convert(model, include=list(layers), overrides=overrides, inplace=True)
        except ValueError as e:
            raise ModelLoadError(f"{path}: the manifest's NRPM settings are not valid ({e})") from None
        for name, cfg in layers.items():
            got = type(model.get_submodule(name)).__name__
            if cfg.get("type") and got != cfg["type"]:
                raise ModelLoadError(f"{path}: layer {name} rebuilt as {got}, the file says {cfg['type']} "
                                     "(is the converter for it registered/imported?)")
    _check_tensor_shapes(model, path, spec)
    try:
        missing, unexpected = st_load_model(model, str(path), strict=False)
    except Exception as e:
        raise ModelLoadError(f"{path}: its tensors could not be loaded into {spec} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]})") from None
    if missing or unexpected:
        missing, unexpected = sorted(missing), sorted(unexpected)  # safetensors returns sets
        raise ModelLoadError(f"{path} does not match its recorded architecture {spec}: missing tensors {missing[:5]}, "
                             f"unexpected tensors {unexpected[:5]} (a damaged or edited file; re-save the model)")
    set_meta(model, **{k: manifest[k] for k in ("arch", "arch_kwargs", "source", "training", "recalibration")
                       if manifest.get(k) is not None})
    if not manifest.get("arch") and not spec.startswith("the given "):
        set_meta(model, arch=spec)
    if manifest.get("paradigm"):
        apply_paradigm(model, manifest["paradigm"])
    get_meta(model)["manifest"] = manifest
    return model.eval()


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _missing_model(source: Any) -> ModelLoadError:
    text = str(source)
    if looks_like_factory(text):
        return ModelLoadError(
            f"{text} names a Python factory, not a model: MODEL is a file or a zoo:/torchvision:/timm: spec. For "
            f"your own architecture give its weights file and the factory: MODEL.pt --arch {text}")
    return ModelLoadError(f"model file {text} not found (give a file, or a spec such as zoo:mnist-mlp; "
                          "`surgery zoo list` lists the zoo)")


def load_model(
    source: str | os.PathLike,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    strict: bool = True,
    data_root: str | None = None,
    arch_kwargs: dict | None = None,
) -> nn.Module:
    """Load a model from a spec (``zoo:mnist-mlp``, ``torchvision:resnet18``...) or a file.

    ``arch_kwargs``: keyword arguments for the architecture's constructor, for a spec or the
    ``arch`` of a weights-only file (``{"num_classes": 10}`` for timm/torchvision; JSON values,
    recorded in the manifest of a later save). A file that records its own architecture takes none.

    Files: our ``.safetensors`` (rebuilt from its manifest; no ``arch`` needed), a plain
    ``.safetensors`` or ``.pt``/``.pth``/``.th`` state_dict (needs ``arch``), or a whole pickled
    module (only with ``trust_pickle=True``). A manifest that names a ``package.module:Callable``
    outside our registries is refused unless ``trust_code=True``. Returns the module in eval
    mode, its provenance (arch, source path and SHA-256) recorded for the manifest of a later save.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidTypeError(f"load_model takes a file path or a spec string, got a {type(source).__name__}")
    if data_root is not None:
        from robust_surgery.data.datasets import check_data_root

        check_data_root(data_root)
    if isinstance(source, str) and is_spec(source) and not Path(source).exists():
        model = build_arch(source, pretrained=True, data_root=data_root, kwargs=arch_kwargs)
        set_meta(model, source={"spec": source})
        return model.eval()
    path = Path(source)
    if not path.exists():
        raise _missing_model(source)
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder; give a model file (.safetensors, .pt, .pth) or a spec")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); the file was not written completely")
    digest = file_sha256(path)
    if path.suffix == ".safetensors":
        manifest = read_manifest(path)
        if manifest is not None:
            if arch_kwargs and manifest.get("arch"):
                raise ModelLoadError(f"{path} records its own architecture ({manifest['arch']}) and its arguments; "
                                     "--arch-kwargs (Python: arch_kwargs=) is only for weights-only files. Drop it")
            if arch_kwargs:
                manifest = {**manifest, "arch_kwargs": dict(arch_kwargs)}
            return _rebuild(manifest, path, arch, data_root, trust_code)
        sd = extract_state_dict(read_checkpoint(path), path)
        obj = None
    else:
        obj = read_checkpoint(path, trust_pickle=trust_pickle)
        sd = None if isinstance(obj, nn.Module) else extract_state_dict(obj, path)
    if isinstance(obj, nn.Module):
        model = obj
        if arch:
            set_meta(model, arch=arch)
    else:
        if not arch:
            raise ModelLoadError(f"{path} holds only weights (a state_dict); say which architecture they belong to: {_ARCH_HELP}")
        model = build_arch(arch, pretrained=False, data_root=data_root, kwargs=arch_kwargs)
        load_weights(model, sd, strict=strict, where=str(path))
    set_meta(model, source={"path": str(path), "sha256": digest})
    return model.eval()


def load(path: str | os.PathLike, *, model: nn.Module | None = None, arch: str | None = None,
         data_root: str | None = None, trust_code: bool = False, trust_pickle: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save` (or ``surgery convert``).

    From the file alone when it records its architecture. ``model``: your own plain network (the
    architecture the file was converted from, e.g. ``torchvision.models.resnet18(num_classes=10)``
    or an ``nn.Module`` of yours), as PEFT's ``PeftModel.from_pretrained(base, path)``: the file's
    NRPM layers are rebuilt on it with their recorded settings and its tensors loaded strictly (a
    mismatch names the first wrong tensor); the module is modified in place and returned. Nothing
    in the file chooses code then. ``trust_code``: allow a manifest that names a
    ``package.module:Callable`` outside our registries to import and call it (only for files you trust).
    """
    if model is None:
        return load_model(path, arch=arch, data_root=data_root, trust_code=trust_code, trust_pickle=trust_pickle)
    if arch is not None:
        raise InvalidInputError("give model= (your own network) or arch= (a spec), not both")
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model= takes the plain nn.Module the file was converted from, got a "
                               f"{type(model).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path}: model= loads a .safetensors file written by robust_surgery.save")
    manifest = read_manifest(path) or {}
    if manifest.get("format") not in (None, FORMAT):
        raise ModelLoadError(f"{path} is not a model file (its manifest says format {manifest.get('format')!r})")
    return _apply_manifest(model, manifest, path, f"the given {type(model).__name__}")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def _layer_manifest(model: nn.Module) -> dict[str, dict]:
    layers = {}
    for name, m in model.named_modules(remove_duplicate=False):  # every name of a shared layer
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
        "recalibration": meta.get("recalibration"),
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

    path = check_output_path(path, suffix=".safetensors", what="model file")
    if arch:
        set_meta(model, arch=arch)
    manifest = build_manifest(model, **extra)
    if not manifest["arch"]:
        warnings.warn(f"{path}: the model records no architecture, so loading it needs your plain network: "
                      "rs.load(path, model=YourNet()) (or arch=...; CLI --arch). To record one: rs.save(model, path, "
                      "arch='package.module:build_fn'), or build the model with rs.load_model/rs.build_arch",
                      UserWarning, stacklevel=2)
    with atomic_path(path) as tmp:
        st_save_model(model, str(tmp), metadata={MANIFEST_KEY: strict_dumps(manifest)})
    return json.loads(strict_dumps(manifest))
