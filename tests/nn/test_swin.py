"""torchvision's Swin attention: converting its qkv/proj makes them run (the parent switches to a
forward that calls them), exact at λ = 1, saved and loaded, and switched back by unconvert."""
from __future__ import annotations

import warnings

import pytest
import torch

import robust_surgery as rs
from robust_surgery.surgery.convert import skipped_layers

torchvision = pytest.importorskip("torchvision")
from torchvision.models.swin_transformer import (  # noqa: E402
    PatchMergingV2, ShiftedWindowAttention, ShiftedWindowAttentionV2, SwinTransformer, SwinTransformerBlockV2)

from robust_surgery.nn.swin import (  # noqa: E402
    ModuleCallingShiftedWindowAttention, ModuleCallingShiftedWindowAttentionV2)


def _tiny_swin(v2: bool = False) -> SwinTransformer:
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=10, **extra)


def _attentions(model):
    return [m for m in model.modules() if isinstance(m, ShiftedWindowAttention)]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shift", [[0, 0], [2, 2], [2, 1]])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (3, 3)], ids=["whole", "padded", "one-window"])
def test_the_module_calling_forward_is_torchvisions_bit_for_bit_with_gradients(v2, shift, hw):
    torch.manual_seed(0)
    cls, calling = ((ShiftedWindowAttentionV2, ModuleCallingShiftedWindowAttentionV2) if v2
                    else (ShiftedWindowAttention, ModuleCallingShiftedWindowAttention))
    attn = cls(16, [4, 4], shift, num_heads=2)
    x = torch.randn(2, *hw, 16, requires_grad=True)
    want = attn(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *attn.parameters()])
    attn.__class__ = calling
    got = attn(x)
    got_grads = torch.autograd.grad(got.square().sum(), [x, *attn.parameters()])
    assert torch.equal(got, want)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_a_converted_swin_runs_its_nrpm_projections_and_unconverts_to_itself(v2):
    torch.manual_seed(0)
    model = _tiny_swin(v2).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left unconverted, so nothing warns
        net = rs.convert(model, lam=0.5)
    calling = ModuleCallingShiftedWindowAttentionV2 if v2 else ModuleCallingShiftedWindowAttention
    attns = _attentions(net)
    assert len(attns) == 2 and all(type(a) is calling for a in attns)
    assert all(isinstance(a.qkv, rs.NRPMLinear) and isinstance(a.proj, rs.NRPMLinear) for a in attns)
    report = rs.conversion_report(net, (3, 32, 32))
    assert [r.name for r in report.layers if r.ran is False] == [] and report.notes == []
    assert report.to_dict()["skipped"] == []
    with torch.no_grad():
        robust = net(x)
        assert (robust - dense).abs().max() > 1e-3  # NRPM ran in the attention
        rs.set_lam(net, 1.0)
        assert torch.equal(net(x), dense)
    back = rs.unconvert(net)
    assert [type(a) for a in _attentions(back)] == [type(a) for a in _attentions(model)]
    with torch.no_grad():
        assert torch.equal(back(x), dense)


def test_only_the_attention_projections_make_the_difference():
    """Converting qkv/proj alone changes the output; excluding them leaves the attention as it was
    (not switched, its children listed as excluded)."""
    torch.manual_seed(0)
    model = _tiny_swin().eval()
    x = torch.rand(2, 3, 32, 32)
    attn_only = rs.convert(model, lam=0.0, include="re:.*attn\\.(qkv|proj)")
    rest = rs.convert(model, lam=0.0, exclude="re:.*attn\\.(qkv|proj)")
    with torch.no_grad():
        assert (attn_only(x) - model(x)).abs().max() > 1e-3
    assert all(type(a) is ShiftedWindowAttention for a in _attentions(rest))
    rows = {r["name"]: r["reason"] for r in skipped_layers(rest)}
    assert rows == {f"features.{i}.0.attn.{p}": "excluded (exclude=)" for i in (1, 3) for p in ("qkv", "proj")}


def test_a_converted_swin_saves_and_loads_with_its_attention_calling_the_nrpm_layers(tmp_path):
    torch.manual_seed(0)
    net = rs.convert(_tiny_swin().eval(), lam=0.3)
    path = tmp_path / "swin.safetensors"
    rs.save(net, path, arch="test_swin:_tiny_swin")
    back = rs.load(path, trust_code=True)
    assert all(type(a) is ModuleCallingShiftedWindowAttention for a in _attentions(back))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


def test_a_converted_swin_exports_with_the_eager_numbers():
    """torch.export traces the switched attention (its NRPM qkv/proj included)."""
    torch.manual_seed(0)
    net = rs.convert(_tiny_swin().eval(), lam=0.5, norm="L1", K=2)
    x = torch.rand(2, 3, 32, 32)
    exported = torch.export.export(net, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), net(x), rtol=1e-5, atol=1e-5)
