"""Architecture specs, and the rule that a file never chooses code to run without consent.

A spec names how to build a network: ``zoo:NAME`` (our model zoo), ``torchvision:NAME``,
``timm:NAME``, one of the package's own registered builders (:data:`BUILDERS`, such as the
reprogramming pipeline's factory), or ``package.module:Callable``, any importable factory.

Who gave the spec decides what it may do. A spec typed by the user (``--arch``, ``arch=``, a
direct :func:`build_arch` call) is the user's own choice and may name any factory. A spec read
from a file (a saved model's manifest, an R2DL file, a state file) resolves only through the
registries above; a ``package.module:Callable`` from a file is refused with
:class:`~robust_surgery.errors.UntrustedCodeError` unless the user consented with
``trust_code=True`` (CLI ``--trust-code``), as transformers does with ``trust_remote_code``.
Keyword arguments read from a file must be JSON values (numbers, strings, booleans, null,
lists, dicts) and must fit the builder's signature.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
from typing import Any, Callable, Iterator, Mapping

from torch import nn

from robust_surgery.errors import InvalidTypeError, ModelLoadError, UntrustedCodeError
from robust_surgery._meta import set_meta

__all__ = ["BUILDERS", "register_builder", "is_spec", "build_arch", "reading_file", "ARCH_HELP", "SPEC_PREFIXES"]

SPEC_PREFIXES = ("zoo:", "torchvision:", "timm:")
ARCH_HELP = "--arch zoo:NAME | torchvision:NAME | timm:NAME | package.module:Callable (Python: arch=...)"

# name -> the factory a file may name without consent: "module:attribute" inside this package
# (imported on first use), or a callable registered in-process with register_builder. The names
# are the builders' import paths, so files written before this registry existed still load.
BUILDERS: dict[str, str | Callable[..., nn.Module]] = {
    "robust_surgery.reprogram.pipeline:build_reprogrammed": "robust_surgery.reprogram.pipeline:build_reprogrammed",
    "robust_surgery.purification.synthetic:sparse_coding_mlp": "robust_surgery.purification.synthetic:sparse_coding_mlp",
}


def register_builder(name: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Let files name ``factory`` as ``name`` (``"mypkg.models:build_net"``) without ``trust_code``.

    Registering is the consent, given in code: a script that registers its own factories loads
    its own saved files as it loads the package's. Returns ``factory``.
    """
    if not callable(factory):
        raise InvalidTypeError(f"register_builder needs a callable factory, got {type(factory).__name__}")
    BUILDERS[name] = factory
    return factory


# Set while a file's records are turned into a model: None outside (the caller's own specs),
# else whether the user consented to code the file names.
_FILE_TRUST: contextvars.ContextVar[bool | None] = contextvars.ContextVar("robust_surgery_file_trust", default=None)
_FILE_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("robust_surgery_file_name", default="the file")


@contextlib.contextmanager
def reading_file(trust_code: bool, name: str | None = None) -> Iterator[None]:
    """Within the block, every spec resolved comes from a file (``name``): the consent rule applies.

    Nested reads keep the strictest setting: a trusted outer read does not trust an inner one
    the user did not consent to (consent is given per call, for everything that call loads).
    """
    outer = _FILE_TRUST.get()
    token = _FILE_TRUST.set(bool(trust_code) if outer is None else (outer and bool(trust_code)))
    name_token = _FILE_NAME.set(str(name) if name else _FILE_NAME.get())
    try:
        yield
    finally:
        _FILE_NAME.reset(name_token)
        _FILE_TRUST.reset(token)


def is_spec(text: Any) -> bool:
    """True when ``text`` names a model spec rather than a file (``zoo:``, ``torchvision:``, ``timm:``)."""
    return isinstance(text, str) and text.startswith(SPEC_PREFIXES)


def looks_like_factory(text: Any) -> bool:
    """True for ``package.module:Callable`` (an identifier path, a colon, an identifier)."""
    if not isinstance(text, str) or text.count(":") != 1 or is_spec(text):
        return False
    mod, name = text.split(":")
    return all(p.isidentifier() for p in mod.split(".")) and name.isidentifier()


def _check_json(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ModelLoadError(f"{where}: keys must be strings, got {k!r}")
            _check_json(v, f"{where}.{k}")
        return
    raise ModelLoadError(f"{where} must be a JSON value (number, string, boolean, null, list or dict), "
                         f"got a {type(value).__name__}")


def _check_signature(factory: Callable, kwargs: Mapping[str, Any], spec: str) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        params = ", ".join(p for p in sig.parameters if sig.parameters[p].kind not in (
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)) or "none"
        raise ModelLoadError(f"the recorded keyword arguments {sorted(kwargs)} do not fit {spec} ({e}); "
                             f"it takes: {params}") from None


def _import(target: str, spec: str) -> Callable:
    mod_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import {mod_name!r} for architecture {spec!r}: {e}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ModelLoadError(f"{mod_name} has no callable {attr!r} (architecture spec {spec!r})")
    return factory


def _factory(spec: str, kwargs: Mapping[str, Any] | None) -> Callable:
    """The callable behind a non-prefixed spec, after the consent rule."""
    from_file = _FILE_TRUST.get()
    if spec in BUILDERS:
        target = BUILDERS[spec]
        factory = target if callable(target) else _import(target, spec)
    else:
        if from_file is not None and not from_file:
            shown = f"{spec}(**{dict(kwargs)})" if kwargs else f"{spec}()"
            raise UntrustedCodeError(
                f"{_FILE_NAME.get()} asks to build its architecture by importing and calling {shown}, which is not one of "
                "robust-surgery's registered builders; loading it would run that code. If you trust where the "
                "file came from, pass --trust-code (Python: trust_code=True); otherwise give the architecture "
                "yourself with --arch (Python: arch=...)."
            )
        if not looks_like_factory(spec):
            raise ModelLoadError(f"architecture spec {spec!r} not understood; use {ARCH_HELP}")
        factory = _import(spec, spec)
    if from_file is not None and kwargs:
        _check_json(dict(kwargs), "arch_kwargs")
        _check_signature(factory, kwargs, spec)
    return factory


def build_arch(spec: str, *, pretrained: bool = False, data_root: str | None = None,
               kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the module named by an architecture spec; ``pretrained`` also loads its weights.

    ``kwargs`` go to the constructor: ``torchvision.models.get_model``, ``timm.create_model``
    (``{"num_classes": 10}``) or a ``package.module:Callable`` factory (JSON-able values only: they
    are recorded in the manifest as ``arch_kwargs`` so :func:`robust_surgery.load` builds the same
    network again); zoo models take none. Inside :func:`reading_file` the consent rule applies.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelLoadError(f"architecture spec {spec!r} not understood; use {ARCH_HELP}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ModelLoadError(f"architecture keyword arguments must be a dict, got a {type(kwargs).__name__}")
    if kwargs and spec.startswith("zoo:"):
        raise ModelLoadError(f"zoo models are built as shipped and take no keyword arguments ({spec!r}, given "
                             f"{sorted(kwargs)}); use torchvision:, timm: or package.module:Callable for those")
    if kwargs:
        _check_json(dict(kwargs), "arch_kwargs")
    kind, _, name = spec.partition(":")
    try:
        if kind == "zoo":
            from robust_surgery.io.zoo import create_model

            model = create_model(name, pretrained=pretrained, data_root=data_root)
        elif kind == "torchvision":
            model = _torchvision(name, pretrained, dict(kwargs or {}))
        elif kind == "timm":
            model = _timm(name, pretrained, dict(kwargs or {}))
        else:
            factory = _factory(spec, kwargs)
            model = factory(**dict(kwargs or {}))
            if not isinstance(model, nn.Module):
                raise ModelLoadError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    except ModelLoadError:
        raise
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ModelLoadError(str(e.args[0]) if e.args else str(e)) from None
    except TypeError as e:  # a keyword argument the constructor does not take
        raise ModelLoadError(f"{spec} does not take the keyword arguments {sorted(kwargs or {})}: {e}") from None
    set_meta(model, arch=spec)
    if kwargs:
        set_meta(model, arch_kwargs=dict(kwargs))
    return model


def _torchvision(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ModelLoadError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    if pretrained:
        _offline_check_torchvision(name)
    try:
        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except (OSError, RuntimeError, MemoryError) as e:  # offline download, or a constructor that cannot allocate
        raise _build_failure("torchvision", name, pretrained, kwargs, e, f"{name}.pth") from None


def _timm(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    if not timm.list_models(name) and not timm.is_model(name):
        raise ModelLoadError(f"timm has no model {name!r}; see timm.list_models('*pattern*')")
    try:
        with hub_offline_unless_reachable() if pretrained else contextlib.nullcontext():
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, MemoryError) as e:
        raise _build_failure("timm", name, pretrained, kwargs, e, f"{name}.safetensors") from None


def _build_failure(lib: str, name: str, pretrained: bool, kwargs: dict, e: Exception, weights_file: str) -> ModelLoadError:
    """The error for a library model that could not be built: out of memory (its arguments ask for
    too large a network), a failed download of pretrained weights, or another failure of its constructor."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, MemoryError) or "allocate" in str(e) or "out of memory" in str(e).lower():
        return ModelLoadError(f"building {lib}:{name} with {kwargs or 'its defaults'} needs more memory than this machine "
                              f"has ({text}); check --arch-kwargs")
    if pretrained:
        return ModelLoadError(f"could not fetch {lib}'s pretrained weights for {name!r} ({type(e).__name__}: {text}). "
                              f"Offline? Pass a weights file instead: surgery convert {weights_file} --arch {lib}:{name}")
    return ModelLoadError(f"could not build {lib}:{name} with {kwargs or 'its defaults'} ({type(e).__name__}: {text})")


# --------------------------------------------------------------------------------------------
# Offline: fail in seconds, not after a minute of retries
# --------------------------------------------------------------------------------------------
def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` seconds (DNS included)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable() -> Iterator[None]:
    """Within the block the Hugging Face hub client works offline (the local cache only) when
    ``HF_HUB_OFFLINE`` is set or the hub does not answer within seconds: a missing download then
    fails at once instead of after huggingface_hub's retries (about a minute)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT)
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _offline_check_torchvision(name: str) -> None:
    """Fail at once when torchvision's weights for ``name`` are neither cached nor downloadable."""
    import os

    import torch
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.exists(cached) and not _reachable(url):
        raise ModelLoadError(
            f"torchvision's pretrained weights for {name!r} are not in the local cache ({cached}) and "
            f"{url.split('/')[2]} cannot be reached. Offline? Pass a weights file instead: surgery convert "
            f"{name}.pth --arch torchvision:{name}")
