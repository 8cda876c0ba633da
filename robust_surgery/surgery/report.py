"""Conversion reports: which layers are (or would be) NRPM, their settings and what they cost.

Costs are per input sample. The linear pattern match costs 2·D FLOPs per output element; NRPM
adds D·(1 + 7K) (forming the terms, then per IRLS step: subtract, abs, reweight (2), multiply
and two sums). The *direct* method of the reference keeps (K + 1) tensors of all the terms,
out_elements · D floats each; our layers bound that by the memory budget instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from robust_surgery.nn.layers import NRPMLayer, linear_mode
from robust_surgery.surgery.convert import LayerConfig, converter_for, group_skipped, nrpm_layers, skipped_layers
from robust_surgery.errors import InvalidInputError

__all__ = ["LayerCost", "ConversionReport", "conversion_report", "inspect_model"]


@dataclass
class LayerCost:
    """One layer's row. Shapes in elements, costs in FLOPs and bytes per input sample."""

    name: str
    type: str
    shape: str
    D: int
    params: int
    norm: str | None = None
    K: int | None = None
    eps: float | None = None
    lam: float | None = None
    out_elements: int | None = None  # per sample; None when no input shape was given
    linear_flops: int | None = None
    nrpm_extra_flops: int | None = None
    direct_bytes: int | None = None  # what the direct method would hold per sample
    ran: bool | None = None  # whether the layer ran in the probe forward (None: no input shape given)


@dataclass
class ConversionReport:
    """Rows for every (convertible or converted) layer plus totals; ``to_dict()`` for JSON."""

    layers: list[LayerCost]
    title: str = "NRPM conversion"
    input_shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # Linear/Conv-like layers left as they are, grouped

    def totals(self) -> dict:
        def total(key):
            vals = [getattr(r, key) for r in self.layers]
            return None if any(v is None for v in vals) else int(sum(vals))

        lin, extra = total("linear_flops"), total("nrpm_extra_flops")
        return {
            "layers": len(self.layers),
            "params": total("params"),
            "linear_flops": lin,
            "nrpm_extra_flops": extra,
            "cost_ratio": None if not lin or extra is None else (lin + extra) / lin,
        }

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "layers": [asdict(r) for r in self.layers],
            "totals": self.totals(),
            "skipped": self.skipped,
            "notes": self.notes,
        }

    def __rich__(self):
        from rich.table import Table

        def fmt(v):
            if v is None:
                return "-"
            if isinstance(v, float):
                return f"{v:.4g}"
            if isinstance(v, int) and v >= 10_000:
                return f"{v:.3g}"
            return str(v)

        t = Table(title=self.title + (f" (input {tuple(self.input_shape)})" if self.input_shape else ""))
        cols = ["name", "type", "shape", "D", "norm", "K", "eps", "lam", "linear FLOPs", "NRPM extra FLOPs", "direct mem"]
        for c in cols:
            t.add_column(c, justify="left" if c in ("name", "type", "shape", "norm") else "right",
                         no_wrap=c in ("name", "shape"))
        for r in self.layers:
            mem = None if r.direct_bytes is None else f"{r.direct_bytes / 2**20:.1f} MiB"
            t.add_row(r.name, r.type, r.shape, fmt(r.D), fmt(r.norm), fmt(r.K), fmt(r.eps), fmt(r.lam),
                      fmt(r.linear_flops), fmt(r.nrpm_extra_flops), mem or "-")
        tot = self.totals()
        ratio = f"×{tot['cost_ratio']:.1f} FLOPs" if tot["cost_ratio"] else ""
        layers = f"{tot['layers']} layer" + ("" if tot["layers"] == 1 else "s")
        t.caption = f"{layers}, {tot['params']:,} parameters {ratio}".strip()
        if not self.skipped and not self.notes:
            return t
        from rich.console import Group
        from rich.text import Text

        lines = [t]
        if self.skipped:
            n = sum(g["count"] for g in self.skipped)
            lines.append(Text(f"Not converted: {n} Linear/Conv-like layer{'s' if n != 1 else ''}", style="bold"))
            for g in self.skipped:
                names = ", ".join(g["names"][:4]) + (", …" if g["count"] > 4 else "")
                lines.append(Text(f"  {g['count']} × {g['type']}: {g['reason']} ({names})"))
        lines += [Text(f"warning: {note}", style="yellow") for note in self.notes]
        return Group(*lines)


def _shape_of(m: nn.Module) -> str:
    if isinstance(m, nn.MultiheadAttention):
        return f"{m.embed_dim}, {m.num_heads} heads"
    if hasattr(m, "nx") and hasattr(m, "nf"):  # transformers' Conv1D
        return f"{m.nx}→{m.nf}"
    if isinstance(m, nn.Linear):
        return f"{m.in_features}→{m.out_features}"
    if isinstance(m, nn.modules.conv._ConvNd):
        k = "×".join(map(str, m.kernel_size))
        g = f" g{m.groups}" if m.groups != 1 else ""
        return f"{m.in_channels}→{m.out_channels} {k}{g}"
    return "?"


def _terms_per_output(m: nn.Module) -> int:
    """D: the terms one output sums (its input features; for attention, those of a query projection)."""
    if isinstance(m, nn.MultiheadAttention):
        return int(m.embed_dim)
    if hasattr(m, "nx") and hasattr(m, "nf"):  # transformers' Conv1D: weight (in, out)
        return int(m.nx)
    return int(m.weight[0].numel()) if getattr(m, "weight", None) is not None else 0


def _out_elements(model: nn.Module, names: list[str], input_shape) -> dict[str, int]:
    """Output elements per sample of the named layers, from one batch-1 forward (run linearly)."""
    if input_shape is None:
        return {}
    input_shape = tuple(input_shape)
    if not input_shape or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in input_shape):
        raise InvalidInputError(f"the input shape must be whole numbers >= 1 such as 3,32,32 (C,H,W, no batch), "
                         f"got {input_shape}")
    found: dict[str, int] = {}
    hooks = []
    mods = dict(model.named_modules())
    def size(out) -> int:  # attention returns (output, weights)
        return int((out[0] if isinstance(out, tuple) else out).numel())

    for n in names:
        hooks.append(mods[n].register_forward_hook(lambda mod, i, o, n=n: found.__setitem__(n, size(o))))
    p = next(model.parameters(), None)
    probe = getattr(model, "example_input", None)  # models whose input is not a float tensor (token ids)
    if callable(probe):
        x = probe(1)
    else:
        x = torch.rand(1, *input_shape, device=p.device if p is not None else None,
                       dtype=p.dtype if p is not None and p.is_floating_point() else None)
    was = model.training
    try:
        model.eval()
        with torch.no_grad(), linear_mode(model):
            try:
                model(x)
            except (RuntimeError, ValueError, IndexError) as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise InvalidInputError(f"the model cannot run on one input of shape {input_shape} (--input-shape, Python "
                                 f"input_shape=): {first}. Give the shape the model takes, channels first, "
                                 "without the batch") from None
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return found


def _row(name: str, m: nn.Module, cfg: LayerConfig | None, out: int | None, probed: bool = False) -> LayerCost:
    D = _terms_per_output(m)
    row = LayerCost(name=name, type=type(m).__name__, shape=_shape_of(m), D=D,
                    params=sum(p.numel() for p in m.parameters(recurse=False) if not p.dim() == 0))
    if cfg is not None:
        s = cfg.settings
        row.norm, row.K, row.eps, row.lam = s.norm, s.K, s.eps, round(cfg.lam, 6)
    if probed:
        row.ran = out is not None
    if out is not None:
        row.out_elements = out
        row.linear_flops = 2 * D * out
        if cfg is not None:
            K = 0 if cfg.settings.is_linear or cfg.lam == 1.0 else cfg.settings.K
            row.nrpm_extra_flops = D * out * (1 + 7 * K) if K else 0
            row.direct_bytes = out * D * 4 * (K + 1) if K else 0
    return row


def conversion_report(model: nn.Module, input_shape=None) -> ConversionReport:
    """Report on the NRPM layers of a converted ``model``; ``input_shape`` (C, H, W...) adds costs."""
    layers = nrpm_layers(model)
    outs = _out_elements(model, [n for n, _ in layers], input_shape)
    for name, _ in layers:  # a child of an NRPM layer that ran (attention's out_proj) ran with it
        parent = name.rpartition(".")[0]
        if name not in outs and parent in outs and isinstance(model.get_submodule(parent), NRPMLayer):
            outs[name] = outs[parent]
    probed = input_shape is not None
    rows = [_row(n, m, LayerConfig(m.settings, m.lam_value), outs.get(n), probed) for n, m in layers]
    dense = [r.name for r in rows if r.lam == 1.0]
    notes = _idle_notes(rows)
    if dense and len(dense) < len(rows):  # all at λ = 1 is a deliberate start (classical training)
        shown = ", ".join(dense[:6]) + (", …" if len(dense) > 6 else "")
        notes.append(f"{len(dense)} converted layer{'s' if len(dense) != 1 else ''} at λ = 1 run as the original "
                     f"layer ({shown}), an override or λ = 1 given for them; fine-tuning leaves λ = 1 frozen")
    return ConversionReport(rows, "NRPM conversion", tuple(input_shape) if input_shape else None,
                            notes, group_skipped(skipped_layers(model)))


def _idle_notes(rows: list[LayerCost]) -> list[str]:
    idle = [r.name for r in rows if r.ran is False]
    if not idle:
        return []
    shown = ", ".join(idle[:6]) + (", …" if len(idle) > 6 else "")
    return [f"{len(idle)} converted layer{'s' if len(idle) != 1 else ''} did not run in the probe forward ({shown}): "
            "the model reads their weights directly (its parent calls F.linear/F.conv on them) or never calls "
            "them, so NRPM has no effect there; exclude them or register a converter for the parent module"]


def inspect_model(model: nn.Module, input_shape=None, config: LayerConfig | None = None) -> ConversionReport:
    """Every convertible layer of a plain ``model``, with the cost it would have under ``config``."""
    layers = [(n, m) for n, m in model.named_modules() if n and converter_for(m)[0] is not None]
    outs = _out_elements(model, [n for n, _ in layers], input_shape)
    cfg = config or LayerConfig()
    rows = [_row(n, m, cfg, outs.get(n), input_shape is not None) for n, m in layers]
    already = [n for n, _ in nrpm_layers(model)]
    notes = [f"{len(already)} layers are NRPM already"] if already else []
    notes += _idle_notes(rows)
    convertible = {n for n, _ in layers}
    skipped = [r for r in skipped_layers(model) if r["name"] not in convertible]
    return ConversionReport(rows, "Convertible layers", tuple(input_shape) if input_shape else None, notes,
                            group_skipped(skipped))
