"""Model zoo: a timm-style registry of pretrained networks with verified weights.

Builders in ``robust_surgery.model_zoo`` register themselves with :func:`register_model`.
:func:`create_model` builds one, finds its weights (the repository's own ``model_zoo/checkpoints``
for embedded models, else the data roots of :func:`robust_surgery.data.datasets.resolve_data_root`),
checks their SHA-256, drops the checkpoint keys the plain architecture does not use (reported in
``model.zoo_info``) and returns the model in eval mode. Every zoo model takes [0, 1] pixels:
any normalisation is the model's first module.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from robust_surgery.data.datasets import DATASETS as _IMAGE_DATASETS
from robust_surgery.data.datasets import DataNotFoundError, DatasetInfo, resolve_data_root
from robust_surgery._files import file_sha256 as sha256_file
from robust_surgery._meta import get_meta
from robust_surgery.io.checkpoint import extract_state_dict, read_checkpoint, weight_mismatches
from robust_surgery.errors import InvalidInputError

__all__ = [
    "ChecksumError",
    "Weights",
    "ZooEntry",
    "ZooError",
    "create_model",
    "get_entry",
    "list_models",
    "register_model",
    "sha256_file",
]

EMBEDDED = "embedded:"

# The image data sets of robust_surgery.data.datasets, plus data sets the zoo knows without an image loader.
DATASETS: dict[str, DatasetInfo] = {
    **_IMAGE_DATASETS,
    "uci-sentiment": DatasetInfo(
        "uci-sentiment", 2, (128,), ("negative", "positive"), 2392, 598,
        "UCI Sentiment Labelled Sentences (Amazon, IMDb, Yelp): token ids, at most 128 word pieces; "
        "test = robust_surgery.data.sequences.stratified_split (20 %, seed 0); loader: load_uci_sentiment",
    ),
}


class ZooError(InvalidInputError):
    """A zoo request cannot be served (unknown model, incompatible checkpoint, ...)."""


class ChecksumError(ZooError):
    """A weights file does not have the SHA-256 recorded in the registry."""


@dataclass(frozen=True)
class Weights:
    """Where a model's weights live and how to read them.

    ``path``: relative to a data root (``nrpm-official/x.pth``) or ``embedded:<file>`` for a file in
    ``model_zoo/checkpoints``. ``state_dict_key``: the entry of a checkpoint dict holding the
    state_dict (``None``: the file is the state_dict). ``strip_prefix``: removed from every key
    (``module.`` from DataParallel). ``drop_suffixes``: keys ending so are dropped and reported.
    ``fill_missing_suffixes`` / ``fill_missing_prefixes``: model keys the file may lack, by their end
    or start (left at their initial value, or filled by the builder, as a frozen encoder is).
    """

    path: str
    sha256: str
    state_dict_key: str | None = None
    strip_prefix: str = ""
    drop_suffixes: tuple[str, ...] = ()
    fill_missing_suffixes: tuple[str, ...] = ()
    fill_missing_prefixes: tuple[str, ...] = ()
    url: str | None = None

    @property
    def embedded(self) -> bool:
        return self.path.startswith(EMBEDDED)


@dataclass(frozen=True)
class ZooEntry:
    """One registered model. ``reference_acc`` is a clean accuracy in percent, measured on the
    first ``eval_n`` test points of ``dataset`` (all of them when ``eval_n`` is None)."""

    name: str
    description: str
    dataset: str
    input_shape: tuple[int, int, int]
    num_classes: int
    weights: str | None
    sha256: str | None
    reference_acc: float | None
    eval_n: int | None
    reference_note: str
    source: str
    license: str
    builder: Callable[[], nn.Module] = field(repr=False, compare=False)
    weights_spec: Weights | None = field(default=None, repr=False, compare=False)


_REGISTRY: dict[str, ZooEntry] = {}


def register_model(name: str, *, dataset: str, weights: Weights | None, description: str,
                   reference_acc: float | None = None, eval_n: int | None = None,
                   reference_note: str = "", source: str = "", license: str = ""):
    """Decorator registering a no-argument builder ``fn() -> nn.Module`` under ``name``."""
    if dataset not in DATASETS:
        raise ZooError(f"register_model({name!r}): unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    info = DATASETS[dataset]

    def deco(fn):
        old = _REGISTRY.get(name)
        if old is not None and (old.builder.__module__, old.builder.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ZooError(f"model name {name!r} is registered twice ({old.builder.__module__} and {fn.__module__})")
        _REGISTRY[name] = ZooEntry(
            name=name, description=description, dataset=dataset, input_shape=info.input_shape,
            num_classes=info.num_classes, weights=weights.path if weights else None,
            sha256=weights.sha256 if weights else None, reference_acc=reference_acc, eval_n=eval_n,
            reference_note=reference_note, source=source, license=license, builder=fn,
            weights_spec=weights,
        )
        return fn

    return deco


def zoo_name(model: nn.Module) -> str | None:
    """The zoo name a model came from: its ``zoo_info`` (create_model), else a saved file's
    ``zoo:NAME`` architecture spec; None for any other model."""
    info = getattr(model, "zoo_info", None)
    if info:
        return info.get("name")
    arch = get_meta(model).get("arch") or ""
    return arch[4:] if arch.startswith("zoo:") else None


def _ensure_registered() -> None:
    import robust_surgery.model_zoo  # noqa: F401  (importing registers the builders)


def list_models() -> list[ZooEntry]:
    """All registered models, sorted by name."""
    _ensure_registered()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_entry(name: str) -> ZooEntry:
    """The registry entry of ``name``; ZooError naming the available models (and a close match)."""
    _ensure_registered()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.4)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ZooError(
        f"Unknown model '{name}'.{hint} Available: {', '.join(sorted(_REGISTRY))} "
        "(see `surgery zoo list`)."
    )


def _checkpoints_dir() -> Path:
    import robust_surgery.model_zoo as mz

    return Path(mz.__file__).resolve().parent / "checkpoints"


def _locate(entry: ZooEntry, data_root) -> Path:
    spec = entry.weights_spec
    if spec.embedded:
        p = _checkpoints_dir() / spec.path[len(EMBEDDED):]
        if not p.is_file():
            raise DataNotFoundError(
                f"The embedded checkpoint of '{entry.name}' is missing: {p}. The installation is "
                f"incomplete; reinstall the package, or rebuild it with `surgery zoo train {entry.name}`."
            )
        return p
    looked = [root / spec.path for root in resolve_data_root(data_root)]
    for p in looked:
        if p.is_file():
            return p
    where = "\n".join(f"  - {p}" for p in looked)
    url = f"\nIts public source: {spec.url} (save it as <root>/{spec.path})." if spec.url else ""
    raise DataNotFoundError(
        f"Pretrained weights for '{entry.name}' need the file '{spec.path}' (sha256 {spec.sha256}).\n"
        f"Looked in:\n{where}\nFix: pass --data-root DIR (data_root= in Python) or set "
        f"ROBUST_SURGERY_DATA=DIR to a folder holding '{spec.path}', or use pretrained=False.{url}"
    )


def _scalar_or_shape(t: torch.Tensor):
    return t.flatten().tolist() if t.numel() <= 4 else f"tensor{tuple(t.shape)}"


def _load_weights(model: nn.Module, entry: ZooEntry, path: Path) -> dict:
    """Load ``path`` into ``model`` per ``entry.weights_spec``; return the report for zoo_info."""
    spec = entry.weights_spec
    ckpt = read_checkpoint(path, consent_flag=None)
    sd = extract_state_dict(ckpt, path, spec.state_dict_key) if spec.state_dict_key else ckpt
    meta = ({k: v for k, v in ckpt.items() if k != spec.state_dict_key and isinstance(v, (int, float, str))}
            if spec.state_dict_key else {})
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ZooError(f"{path}: the state_dict is not a mapping of names to tensors")
    if spec.strip_prefix:
        sd = {k[len(spec.strip_prefix):] if k.startswith(spec.strip_prefix) else k: v for k, v in sd.items()}
    dropped = sorted(k for k in sd if spec.drop_suffixes and k.endswith(spec.drop_suffixes))
    dropped_values = {k: _scalar_or_shape(sd[k]) for k in dropped}
    sd = {k: v for k, v in sd.items() if k not in dropped}

    missing, unexpected, bad_shape = weight_mismatches(model, sd)
    own = model.state_dict()
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in bad_shape]
    filled = [k for k in missing if (spec.fill_missing_suffixes and k.endswith(spec.fill_missing_suffixes))
              or (spec.fill_missing_prefixes and k.startswith(spec.fill_missing_prefixes))]
    missing = [k for k in missing if k not in filled]
    if unexpected or missing or bad_shape:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if missing:
            parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if bad_shape:
            parts.append(f"shape mismatches {bad_shape[:4]}")
        raise ZooError(
            f"{path} does not fit the '{entry.name}' architecture: {'; '.join(parts)}. "
            "The file is a different model or version than the registry expects."
        )
    model.load_state_dict(sd, strict=False)
    return {"dropped_keys": dropped, "dropped_values": dropped_values, "filled_keys": filled,
            "checkpoint_meta": meta}


def create_model(name: str, pretrained: bool = True, data_root: str | os.PathLike | None = None) -> nn.Module:
    """Build zoo model ``name`` (inputs float N x C x H x W in [0,1], outputs N x num_classes logits).

    ``pretrained``: load and SHA-256-verify its weights (see :class:`Weights` for where they are
    looked up). The model comes back in eval mode with ``model.zoo_info``: name, weights path,
    sha256, dropped_keys (checkpoint keys deliberately not loaded), filled_keys, notes.
    """
    entry = get_entry(name)
    model = entry.builder()
    info = {"name": entry.name, "weights": None, "sha256": None, "dropped_keys": [], "filled_keys": [],
            "notes": entry.reference_note}
    if pretrained:
        if entry.weights_spec is None:
            raise ZooError(f"'{entry.name}' has no pretrained weights; use pretrained=False")
        path = _locate(entry, data_root)
        digest = sha256_file(path)
        if digest != entry.weights_spec.sha256:
            src = f" Get the original from {entry.weights_spec.url}." if entry.weights_spec.url else ""
            raise ChecksumError(
                f"SHA-256 mismatch for '{entry.name}' weights {path}: expected {entry.weights_spec.sha256}, "
                f"got {digest}. The file is corrupt or a different version; replace it.{src}"
            )
        report = _load_weights(model, entry, path)
        info.update(weights=str(path), sha256=digest, **report)
    else:
        info["notes"] = "random initialisation (pretrained=False)"
    model.zoo_info = info
    return model.eval()
