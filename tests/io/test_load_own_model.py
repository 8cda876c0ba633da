"""Issue 32: a model converted in Python round-trips through rs.save and rs.load(path, model=plain),
for a custom nn.Module, torchvision's ResNet-18 and a timm model: the same outputs after loading."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import robust_surgery as rs


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 5))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def _torchvision():
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def _timm():
    import timm

    return timm.create_model("resnet10t", pretrained=False, num_classes=10)


@pytest.mark.parametrize("build,shape", [(MyNet, (2, 3, 8, 8)), (_torchvision, (2, 3, 32, 32)), (_timm, (2, 3, 32, 32))],
                         ids=["custom", "torchvision-resnet18", "timm-resnet10t"])
def test_a_model_converted_in_python_loads_back_on_its_plain_network(build, shape, tmp_path):
    torch.manual_seed(0)
    plain = build().eval()
    converted = rs.convert(plain, K=2, lam=0.7, exclude="conv1" if build is not MyNet else None).eval()
    with torch.no_grad():  # make λ and the weights differ from a fresh build
        for name, layer in rs.nrpm_layers(converted):
            layer.set_lam(0.3 if "fc" in name or "head" in name else 0.8)
    x = torch.rand(*shape)
    with torch.no_grad():
        want = converted(x)
    path = tmp_path / "m.safetensors"
    with pytest.warns(UserWarning, match=r"rs.load\(path, model=YourNet\(\)\)"):
        rs.save(converted, path)
    torch.manual_seed(1)  # another initialisation: every number must come from the file
    loaded = rs.load(path, model=build())
    assert [n for n, _ in rs.nrpm_layers(loaded)] == [n for n, _ in rs.nrpm_layers(converted)]
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def test_a_plain_network_that_does_not_fit_names_the_first_wrong_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.warns(UserWarning):
        rs.save(rs.convert(MyNet(), K=1, lam=0.5), path)

    class Wider(MyNet):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 7))

    with pytest.raises(ValueError, match=r"tensor head.1.bias has shape \(5,\), but the given Wider wants \(7,\); the given network is not the one"):
        rs.load(path, model=Wider())
    with pytest.raises(ValueError, match="not both"):
        rs.load(path, model=MyNet(), arch="zoo:mnist-mlp")
