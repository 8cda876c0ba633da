"""timm's weight-standardized convs (BiT, NFNet) convert: exact at λ = 1, the NRPM conv of the
standardized kernel below it, gradients to weight and gain, whole models, save/load, unconvert."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import robust_surgery as rs
from robust_surgery.nn.functional import NRPMSettings, nrpm_conv

timm = pytest.importorskip("timm")
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame  # noqa: E402


def _standardized(layer) -> torch.Tensor:
    """The kernel by the formula: per output channel (w - mean) / sqrt(var + eps), times gain · scale."""
    w = layer.weight.double()
    flat = w.reshape(w.shape[0], -1)
    mean, var = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
    out = (flat - mean) / torch.sqrt(var + layer.eps)
    if hasattr(layer, "gain"):
        out = out * (layer.gain.double() * layer.scale).view(-1, 1)
    return out.reshape_as(w).float()


def _same_pad(x, layer):
    """TensorFlow "same": total padding max((⌈n/s⌉ - 1)·s + (k - 1)·d + 1 - n, 0), the extra pixel after."""
    pads = []
    for n, k, s, d in zip(x.shape[-2:], layer.kernel_size, layer.stride, layer.dilation):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, (*pads[1], *pads[0]))


LAYERS = {
    "StdConv2d": lambda: StdConv2d(3, 8, 3, stride=2),
    "StdConv2dSame": lambda: StdConv2dSame(3, 8, 3, stride=2),
    "ScaledStdConv2d": lambda: ScaledStdConv2d(3, 8, 3, stride=1, gain_init=0.7),
    "ScaledStdConv2dSame": lambda: ScaledStdConv2dSame(3, 8, 4, stride=2, bias=True),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_standardized_conv_is_exact_at_lambda_one_and_the_nrpm_conv_of_its_kernel_below(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = torch.rand(2, 3, 9, 11)
    settings = NRPMSettings(norm="L1", K=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = rs.convert(torch.nn.Sequential(layer), lam=1.0, norm="L1", K=3)
    nrpm = net[0]
    assert type(nrpm).__name__ == f"NRPM{kind}" and isinstance(nrpm, type(layer))
    with torch.no_grad():
        assert torch.equal(nrpm(x), layer(x))
        nrpm.set_lam(0.3)
        got = nrpm(x)
        xp = _same_pad(x, layer) if getattr(layer, "same_pad", False) else x
        want = nrpm_conv(xp, _standardized(layer), layer.bias, 0.3, settings, stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - layer(x)).abs().max() > 1e-3
        torch.testing.assert_close(nrpm(x[0]), got[0], rtol=1e-5, atol=1e-5)  # unbatched
    nrpm(x).square().sum().backward()
    assert nrpm.weight.grad.abs().sum() > 0 and nrpm.lam_logit.grad is not None
    if hasattr(layer, "gain"):
        assert nrpm.gain.grad.abs().sum() > 0
    back = rs.unconvert(net)
    assert type(back[0]) is type(layer)


@pytest.mark.parametrize("name", ["resnetv2_50x1_bit", "dm_nfnet_f0"])
def test_bit_and_nfnet_convert_whole_exact_at_lambda_one_and_unconvert_to_themselves(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer has a converter now
        net = rs.convert(model, lam=1.0)
    assert rs.conversion_report(net).to_dict()["skipped"] == []
    with torch.no_grad():
        assert torch.equal(net(x), want)
    back = rs.unconvert(net)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]


def _small_bit():
    from functools import partial

    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=(1, 1, 1, 1), channels=(128, 128, 128, 128), num_classes=10, stem_chs=64,
                    conv_layer=StdConv2d, norm_layer=partial(GroupNormAct, num_groups=32))  # BiT's layers, small


def test_a_converted_bit_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    net = rs.convert(_small_bit().eval(), lam=0.5, include="stages.0.*")
    path = tmp_path / "bit.safetensors"
    rs.save(net, path, arch="test_timm_std_conv:_small_bit")
    back = rs.load(path, trust_code=True)
    assert {type(m).__name__ for _, m in rs.nrpm_layers(back)} == {"NRPMStdConv2d"}
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
