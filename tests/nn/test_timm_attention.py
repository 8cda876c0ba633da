"""timm's BEiT, EVA and Swin-V2 attention add their q/v bias themselves and call F.linear on
qkv.weight: converted, they take timm's own separate-bias path so the NRPM qkv runs; exact at
λ = 1, saved and loaded, switched back by unconvert."""
from __future__ import annotations

import warnings

import pytest
import torch

import robust_surgery as rs

timm = pytest.importorskip("timm")
from robust_surgery.nn.timm_attention import QkvBiasAfterNRPM  # noqa: E402


def _tiny(family: str):
    if family == "beit":
        from timm.models.beit import Beit

        return Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    if family == "eva":
        return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=32, patch_size=8,
                                 embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=32, window_size=4, embed_dim=16,
                             depths=(1, 1), num_heads=(2, 2), num_classes=10)


def _model(family: str):
    torch.manual_seed(0)
    model = _tiny(family).eval()
    with torch.no_grad():  # timm starts q/v biases at 0: make the bias path matter
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_()
    return model


def _attentions(model):
    return [m for n, m in model.named_modules() if n.endswith(".attn")]


FAMILIES = ["beit", "eva", "swinv2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_timm_attention_runs_its_nrpm_qkv_through_timms_separate_bias_path(family):
    model = _model(family)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unconverted
        exact = rs.convert(model, lam=1.0)
    with torch.no_grad():
        assert torch.equal(exact(x), dense)  # λ = 1: timm's fused-bias F.linear, bit for bit
    net = rs.convert(model, lam=0.4, norm="L1", K=2)
    attns = _attentions(net)
    assert attns and all(isinstance(a, QkvBiasAfterNRPM) and a.qkv_bias_separate for a in attns)
    report = rs.conversion_report(net, (3, 32, 32))
    assert [r.name for r in report.layers if r.ran is False] == [] and report.to_dict()["skipped"] == []
    with torch.no_grad():
        robust = net(x)
        # the same NRPM layers under timm's own classes with the switch set by hand: the same numbers
        by_hand = rs.unconvert(net)
        for name, layer in rs.nrpm_layers(net):
            by_hand.get_submodule(name.rpartition(".")[0])._modules[name.rpartition(".")[2]] = layer
        for a in _attentions(by_hand):
            assert type(a).__name__ in ("Attention", "EvaAttention", "WindowAttention")
            a.qkv_bias_separate = True
        assert torch.equal(by_hand(x), robust)
        assert not torch.equal(robust, dense)
    back = rs.unconvert(net)
    assert [type(a) for a in _attentions(back)] == [type(a) for a in _attentions(model)]
    assert all(a.qkv_bias_separate is False for a in _attentions(back))
    with torch.no_grad():
        assert torch.equal(back(x), dense)


def test_the_switch_follows_lambda_and_keeps_a_models_own_setting():
    model = _model("beit")
    model.blocks[1].attn.qkv_bias_separate = True
    net = rs.convert(model, lam=0.5)
    a0, a1 = (b.attn for b in net.blocks)
    assert a0.qkv_bias_separate and a1.qkv_bias_separate
    rs.set_lam(net, 1.0)
    assert a0.qkv_bias_separate is False and a1.qkv_bias_separate is True
    with rs.linear_mode(net):  # the report's probe runs so: qkv is called, and seen to run
        assert a0.qkv_bias_separate
    report = rs.conversion_report(net, (3, 32, 32))
    assert [r.name for r in report.layers if r.ran is False] == []
    assert rs.unconvert(net).blocks[1].attn.qkv_bias_separate is True


def test_a_converted_beit_saves_and_loads_with_its_qkv_running(tmp_path):
    net = rs.convert(_model("beit"), lam=0.3)
    path = tmp_path / "beit.safetensors"
    rs.save(net, path, arch="test_timm_attention:_model_beit")
    back = rs.load(path, trust_code=True)
    assert all(isinstance(a, QkvBiasAfterNRPM) for a in _attentions(back))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


def _model_beit():
    return _tiny("beit")


def test_a_converted_beit_exports_with_the_eager_numbers():
    """torch.export traces through the qkv_bias_separate property (read at trace time)."""
    net = rs.convert(_model("beit"), lam=0.5, norm="L1", K=2)
    x = torch.rand(2, 3, 32, 32)
    exported = torch.export.export(net, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), net(x), rtol=1e-5, atol=1e-5)
