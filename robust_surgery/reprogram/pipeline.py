"""The reprogrammed model: program → frozen source → label mapping, as one module that saves.

``ReprogrammedModel(x)`` takes target inputs ``(B, c, h, w)`` in [0, 1] and returns
``log h(F(X̃))``, the log of the mapped source probabilities ``(B, n_target)``. Log-probabilities
are logits-like: the attacks' cross-entropy on them is −log(h_y / Σ_j h_j) (the mapped
probabilities renormalised), argmax is the mapped prediction, so ``robust_surgery.evaluate``
attacks the whole pipeline on target inputs. The source is frozen: no parameter requires a
gradient and it stays in eval mode whatever ``train()`` is called with.

:func:`save_reprogrammed` writes one ``.safetensors`` whose manifest names the factory
:func:`build_reprogrammed` with JSON-able keyword arguments (the source's architecture spec,
the canvas, the mapping table), so ``robust_surgery.load(path)`` and ``surgery evaluate PATH``
rebuild it from the file alone, NRPM layers of the source included (the manifest's per-layer
records, named ``source.<layer>``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from robust_surgery.io.model_file import ModelLoadError, build_arch, save
from robust_surgery._meta import get_meta
from robust_surgery.evaluation.kinds import Source
from robust_surgery.io.runrecord import state_digest
from robust_surgery.reprogram.mapping import LabelMapping, LinearMapping, mapping_from_dict
from robust_surgery.reprogram.program import CanvasSpec, Program
from robust_surgery.errors import InvalidInputError, InvalidTypeError

__all__ = ["ReprogrammedModel", "build_reprogrammed", "save_reprogrammed", "freeze_source", "state_digest",
           "FACTORY"]

FACTORY = "robust_surgery.reprogram.pipeline:build_reprogrammed"
_LOG_FLOOR = 1e-12


def freeze_source(source: nn.Module) -> nn.Module:
    """Put ``source`` in eval mode with no parameter requiring a gradient; return it."""
    for p in source.parameters():
        p.requires_grad_(False)
    return source.eval()


class ReprogrammedModel(nn.Module):
    """program → frozen source → mapping. ``forward``: ``(B, c, h, w)`` in [0, 1] → ``(B, n_target)`` log h.

    ``source`` maps ``(B, C, H, W)`` inputs in the canvas's input range to ``(B, n_source)``
    logits (softmax is applied here). ``program`` holds W (with a :class:`LinearMapping`, its A
    and b train too); ``mapping`` the label table or the learned output layer.
    """

    def __init__(self, source: nn.Module, program: Program, mapping: LabelMapping | LinearMapping):
        super().__init__()
        self.program = program
        self.source = freeze_source(source)
        self.mapping = mapping

    def train(self, mode: bool = True):
        """Train mode for the program only: the frozen source always stays in eval mode."""
        super().train(mode)
        self.source.eval()
        return self

    def source_probs(self, x_source: torch.Tensor) -> torch.Tensor:
        """Source softmax probabilities ``(B, n_source)`` of programmed inputs ``(B, C, H, W)``."""
        return torch.softmax(self.source(x_source), dim=-1)

    def mapped_probs(self, x: torch.Tensor) -> torch.Tensor:
        """h(F(X̃)): ``(B, n_target)`` mean source probability over each target class's labels."""
        return self.mapping(self.source_probs(self.program(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c, h, w)`` target inputs in [0, 1] → ``(B, n_target)`` log mapped probabilities."""
        return self.mapped_probs(x).clamp_min(_LOG_FLOOR).log()

    def arch_kwargs(self) -> dict:
        """The JSON-able keyword arguments of :func:`build_reprogrammed` that rebuild this module."""
        meta = get_meta(self.source)
        spec = meta.get("arch")
        if not spec:
            raise InvalidInputError("the source model records no architecture spec, so the reprogrammed model could not be "
                             "rebuilt from its file; load the source with robust_surgery.load_model('zoo:NAME' or a "
                             "saved .safetensors) or set robust_surgery._meta.set_meta(source, arch='pkg.module:factory')")
        return {"source_arch": spec, "source_kwargs": meta.get("arch_kwargs"), "program": {
            **self.program.spec.to_dict(), "low_dim": self.program.low_dim,
            **({"cover_data": True} if self.program.cover_data else {})}, "mapping": self.mapping.to_dict()}


def build_reprogrammed(source_arch: str, program: Mapping[str, Any], mapping: Mapping[str, Any],
                       source_kwargs: Mapping[str, Any] | None = None) -> ReprogrammedModel:
    """Factory that :func:`robust_surgery.load` calls: an untrained pipeline of the recorded geometry.

    ``source_arch``: the source's architecture spec (``zoo:cifar-resnet20``...), built without
    pretrained weights (the file holds them); ``program``: :meth:`CanvasSpec.to_dict` plus
    ``low_dim`` (and ``cover_data`` when true); ``mapping``: :meth:`LabelMapping.to_dict` or
    :meth:`LinearMapping.to_dict`.
    """
    program = dict(program)
    low_dim = program.pop("low_dim", None)
    cover_data = bool(program.pop("cover_data", False))
    source = build_arch(source_arch, pretrained=False, kwargs=source_kwargs or None)
    return ReprogrammedModel(source, Program(CanvasSpec(**program), low_dim, cover_data), mapping_from_dict(mapping))


def save_reprogrammed(model: ReprogrammedModel, path: str | os.PathLike, **extra) -> dict:
    """Write ``model`` to one ``.safetensors`` that :func:`robust_surgery.load` rebuilds; return the manifest.

    ``extra`` goes into the manifest (e.g. ``reprogram={...}`` with the method and its report).
    """
    if not isinstance(model, ReprogrammedModel):
        raise InvalidTypeError(f"save_reprogrammed takes a ReprogrammedModel, got {type(model).__name__}")
    kwargs = model.arch_kwargs()
    meta = get_meta(model)
    meta.update(arch=FACTORY, arch_kwargs=kwargs)
    src = get_meta(model.source).get("source")
    if src is not None and meta.get("source") is None:
        meta["source"] = src
    return save(model, path, arch=FACTORY, **extra)


def load_source(spec: str, *, arch: str | None = None, data_root: str | None = None, trust_code: bool = False,
                trust_pickle: bool = False) -> nn.Module:
    """The frozen source model: a spec (``zoo:cifar-resnet20``) or a saved/converted model file
    (``trust_code``/``trust_pickle`` as in :func:`robust_surgery.load_model`)."""
    from robust_surgery.io.model_file import load_model

    model = load_model(spec, arch=arch, data_root=data_root, trust_code=trust_code, trust_pickle=trust_pickle)
    if isinstance(model, ReprogrammedModel):
        raise ModelLoadError(f"{spec} is already a reprogrammed model; give its source model instead")
    return freeze_source(model)


def load_target(target: str, split: str = "train", *, n: int | None = None, data_root: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Target images ``(N, c, h, w)`` in [0, 1] and labels ``(N,)``: ``mnist`` or an image data path."""
    from robust_surgery.data.resolve import resolve_data

    return resolve_data(target, split, n=n, data_root=data_root).tensors


def source_canvas(source: nn.Module) -> tuple[int, int, int]:
    """The source's input shape ``(C, H, W)`` for a zoo architecture (also a converted/saved one)."""
    spec = get_meta(source).get("arch") or ""
    if spec.startswith("zoo:"):
        from robust_surgery.io.zoo import get_entry

        return tuple(get_entry(spec[4:]).input_shape)
    raise InvalidInputError(f"cannot tell the input size of source {spec or type(source).__name__}; give the canvas "
                     "explicitly (Python: canvas=(C, H, W); CLI: --canvas 3,32,32)")


def source_classes(source: nn.Module, canvas: tuple[int, int, int]) -> int:
    """Number of source classes: the width of the source's output on one blank canvas."""
    with torch.no_grad():
        return int(source(torch.zeros(1, *canvas, device=next(source.parameters()).device)).shape[-1])


MAPPINGS = ("one-to-one", "random", "frequency", "ilm", "linear")


def choose_mapping(kind: str, y: torch.Tensor, n_target: int, n_source: int, m: int = 1, *, seed: int = 0,
                   probs_fn=None, program: Program | None = None, x: torch.Tensor | None = None,
                   batch_size: int = 256) -> LabelMapping | LinearMapping:
    """A label mapping by name: ``one-to-one``, ``random`` (m per class), ``frequency``, ``ilm``
    or ``linear`` (a learned output layer, :class:`~.mapping.LinearMapping`; AR only).

    ``frequency`` runs the initial program (W = 0) on the target training inputs ``x`` through
    ``probs_fn`` (source probabilities ``(B, n_source)``: a :class:`~.query.QueryOracle` in BAR,
    so these queries are counted) and applies the greedy histogram assignment. ``ilm`` (iterative
    label mapping) starts the same way; the trainers then re-solve it from the current program
    each epoch with :func:`remap_iteratively`.
    """
    from robust_surgery.reprogram.mapping import frequency_mapping, one_to_one, random_mapping

    if kind == "one-to-one":
        if m != 1:
            raise InvalidInputError("the one-to-one mapping has m = 1; use random or frequency for m > 1")
        return one_to_one(n_target, n_source)
    if kind == "random":
        return random_mapping(n_target, n_source, m, seed=seed)
    if kind == "linear":
        if m != 1:
            raise InvalidInputError("the linear mapping learns its own combination of source classes: drop --m (m = 1)")
        return LinearMapping(n_target, n_source)
    if kind in ("frequency", "ilm"):
        if probs_fn is None or program is None or x is None:
            raise InvalidInputError(f"the {kind} mapping needs the source (probs_fn), the program and the target inputs")
        return frequency_mapping(_source_predictions(probs_fn, program, x, batch_size), y, n_target, n_source, m)
    raise InvalidInputError(f"unknown mapping {kind!r}: choose from {', '.join(MAPPINGS)}")


def _source_predictions(probs_fn, program, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Source labels ``(N,)`` the program's current output gets, on the CPU."""
    with torch.no_grad():
        return torch.cat([probs_fn(program(x[i:i + batch_size])).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def remap_iteratively(mapping: LabelMapping, probs_fn, program: Program, x: torch.Tensor, y: torch.Tensor, *,
                      batch_size: int = 256) -> bool:
    """One step of iterative label mapping (ILM; Chen et al., CVPR 2023, "Understanding and Improving
    Visual Prompting: A Label-Mapping Perspective"): re-solve the frequency mapping from the source
    labels the *current* program gets on the target training inputs ``x`` ``(N, c, h, w)`` with
    labels ``y`` ``(N,)``, and write it into ``mapping`` in place (same m per class). Returns whether
    the assignment changed. Through a :class:`~.query.QueryOracle`, the N queries are counted."""
    from robust_surgery.reprogram.mapping import frequency_mapping

    pred = _source_predictions(probs_fn, program, x, batch_size)
    new = frequency_mapping(pred, y, mapping.n_target, mapping.n_source, mapping.assignment.shape[1])
    changed = not torch.equal(new.assignment, mapping.assignment.cpu())
    mapping.assignment.copy_(new.assignment.to(mapping.assignment.device))
    return changed


def target_accuracy(model: ReprogrammedModel, x: torch.Tensor, y: torch.Tensor, *, attacks: Sequence[str] = (),
                    eps: Sequence[float] = (), steps: int = 20, seed: int = 0, batch_size: int = 128,
                    progress: bool = False, amp: str | torch.dtype | None = None) -> dict:
    """Clean (and, with ``attacks`` and ``eps``, adversarial) accuracy in % of the whole pipeline.

    ``x`` ``(N, c, h, w)`` target test inputs in [0, 1], ``y`` ``(N,)``. The attacks run on the
    pipeline program → source → mapping (:func:`robust_surgery.evaluate`, no report card); the
    result has ``clean_acc``, ``n_examples``, ``robust_acc`` ``{attack: {eps_str: %}}`` and
    ``worst_acc`` ``{eps_str: %}`` (per point, over every attack run at that ε: the headline). The
    pipeline runs where its parameters are; ``amp``: autocast (``bf16``/``fp16``).
    """
    from robust_surgery.evaluation.run import evaluate, format_eps
    from robust_surgery._loops import evaluate_accuracy

    if not attacks or not eps:
        c, n = evaluate_accuracy(model, x, y, batch_size=max(batch_size, 256), amp=amp)
        return {"clean_acc": 100.0 * c / n, "n_examples": n, "robust_acc": {}, "worst_acc": {}}
    report = evaluate(model, (x, y), attacks=attacks, eps=eps, steps=steps, seed=seed, batch_size=batch_size,
                      checks=False, progress=progress, device=next(model.parameters()).device, amp=amp)
    robust: dict[str, dict[str, float]] = {}
    for r in report.results:
        if r["source"] == Source.DIRECT and r.get("check") is None:
            robust.setdefault(r["attack"], {})[format_eps(r["eps"])] = r["robust_acc"]
    summary = report.to_dict()
    return {"clean_acc": summary["clean_acc"], "n_examples": report.n, "robust_acc": robust,
            "worst_acc": summary["models"][report.variants[0]]["worst_robust_acc"],
            "eval_seconds": round(report.seconds, 2)}
