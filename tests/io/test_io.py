"""Model I/O: specs, state dicts, pickles, our safetensors with manifest, atomic writes."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import robust_surgery as rs
from robust_surgery.io.model_file import MANIFEST_KEY, atomic_path, file_sha256


class TinyNet(nn.Module):
    """A user architecture, built through the spec ARCH below."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


ARCH = "test_io:tiny_net"  # tests/ is on sys.path under pytest


def test_zoo_spec_convert_save_load_roundtrip(tmp_path, shared_data):
    base = rs.load_model("zoo:mnist-mlp", data_root=str(shared_data))
    conv = rs.convert(base, norm="L1", K=1, eps=5e-5, lam=0.6, overrides={"fc3": {"lam": 1.0}})
    out = tmp_path / "m.safetensors"
    manifest = rs.save(conv, out)
    assert manifest["arch"] == "zoo:mnist-mlp" and manifest["paradigm"] == 1
    assert manifest["layers"]["fc1"] == {"type": "NRPMLinear", "norm": "L1", "K": 1, "eps": 5e-5, "gamma": 4.0,
                                         "delta": 3.0, "lam": pytest.approx(0.6)}
    assert manifest["layers"]["fc3"]["lam"] == 1.0
    assert manifest["source"]["spec"] == "zoo:mnist-mlp"
    assert manifest["package_version"] == rs.__version__
    back = rs.load(out)  # the file alone: no data root, no arch
    assert type(back.fc1) is rs.NRPMLinear and back.fc3.lam_value == 1.0
    x = torch.rand(7, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), conv(x))
    sd1, sd2 = conv.state_dict(), back.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_state_dict_file_needs_arch_and_records_hash(tmp_path):
    net = tiny_net()
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    with pytest.raises(rs.ModelLoadError, match="holds only weights.*--arch"):
        rs.load_model(path)
    loaded = rs.load_model(path, arch=ARCH)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
    conv = rs.convert(loaded, lam=0.5, K=1)
    manifest = rs.save(conv, tmp_path / "tiny.nrpm.safetensors")
    assert manifest["source"] == {"path": str(path), "sha256": file_sha256(path)}
    # the manifest names this test's own factory: loading calls it only with the user's consent
    with pytest.raises(rs.UntrustedCodeError, match="test_io:tiny_net.*trust_code=True"):
        rs.load(tmp_path / "tiny.nrpm.safetensors")
    back = rs.load(tmp_path / "tiny.nrpm.safetensors", trust_code=True)
    with torch.no_grad():
        assert torch.equal(back(x), conv(x))
    # BatchNorm running statistics travel too
    assert torch.equal(back.bn.running_mean, conv.bn.running_mean)


def test_plain_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    net = tiny_net()
    path = tmp_path / "plain.safetensors"
    save_file(net.state_dict(), str(path))
    loaded = rs.load_model(path, arch=ARCH)
    assert torch.equal(loaded.fc.weight, net.fc.weight)


def test_mismatched_weights_are_clear_errors(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(rs.ModelLoadError, match=r"fc.weight has shape \(3, 3\).*Is --arch right"):
        rs.load_model(path, arch=ARCH)
    sd = tiny_net().state_dict()
    sd["extra.robust_sum.lmbd"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(rs.ModelLoadError, match="1 unexpected.*--non-strict"):
        rs.load_model(path, arch=ARCH)
    assert isinstance(rs.load_model(path, arch=ARCH, strict=False), TinyNet)


def test_pickled_module_needs_explicit_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tiny_net(), path)
    with pytest.raises(rs.ModelLoadError, match="pickled Python objects.*--trust-pickle"):
        rs.load_model(path)
    model = rs.load_model(path, trust_pickle=True)
    assert isinstance(model, TinyNet)


def test_bad_specs_and_paths():
    with pytest.raises(rs.ModelLoadError, match="not found"):
        rs.load_model("no/such/file.pt")
    with pytest.raises(rs.ModelLoadError, match="torchvision has no model 'resnet999'"):
        rs.load_model("torchvision:resnet999")
    with pytest.raises(rs.ModelLoadError, match="cannot import 'no_such_pkg.mod'"):
        rs.build_arch("no_such_pkg.mod:Net")
    with pytest.raises(Exception, match="mnist-mpl.*mnist-mlp"):
        rs.load_model("zoo:mnist-mpl")


def test_offline_pretrained_download_is_a_clear_error(monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(rs.ModelLoadError, match=r"Offline\? Pass a weights file.*--arch torchvision:resnet18"):
        rs.load_model("torchvision:resnet18")


def test_save_is_atomic_and_checks_suffix(tmp_path):
    with pytest.raises(ValueError, match="ending in .safetensors"):
        rs.save(tiny_net(), tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rs.save(tiny_net(), tmp_path / "missing" / "x.safetensors")
    target = tmp_path / "a.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_manifest_is_json_in_metadata_and_tied_weights_survive(tmp_path):
    from safetensors import safe_open

    lin = nn.Linear(4, 4)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    c = rs.convert(m, lam=0.3)
    path = tmp_path / "tied.safetensors"
    rs.save(c, path, arch=None)
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()[MANIFEST_KEY])
    assert set(manifest["layers"]) == {"0", "2"}  # every name of the shared layer, so load rebuilds it shared
    with pytest.raises(rs.ModelLoadError, match="records no architecture"):
        rs.load(path)


def test_not_a_model_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(rs.ModelLoadError, match="not a readable .safetensors"):
        rs.load(bad)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_text("hello")
    with pytest.raises(rs.ModelLoadError, match="bad.pt is not a PyTorch file"):
        rs.load_model(bad_pt)


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
        assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o644  # not mkstemp's 0600
    finally:
        os.umask(umask)
