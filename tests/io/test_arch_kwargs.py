"""Architecture specs with constructor arguments (--arch-kwargs / arch_kwargs=), the save warning for
models without a recorded architecture, and pretrained specs that fail fast offline."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.cli.app import app
from robust_surgery.io import archspec

runner = CliRunner()


def test_timm_spec_with_num_classes_round_trips_through_a_converted_file(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = rs.build_arch("timm:resnet18", kwargs={"num_classes": 10})
    assert model.fc.out_features == 10
    net = rs.convert(model, include="fc", norm="L1", K=1, lam=0.5)
    path = tmp_path / "r18.safetensors"
    manifest = rs.save(net, path)
    assert manifest["arch"] == "timm:resnet18" and manifest["arch_kwargs"] == {"num_classes": 10}
    back = rs.load(path)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), net.eval()(x), rtol=0, atol=0)


def test_cli_weights_file_with_arch_kwargs_and_the_mismatch_without_them(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    res = runner.invoke(app, ["inspect", str(weights), "--arch", "torchvision:resnet18", "--arch-kwargs",
                              '{"num_classes": 10}', "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["layers"][-1]["shape"] == "512→10"
    res = runner.invoke(app, ["inspect", str(weights), "--arch", "torchvision:resnet18"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "has shape (10" in res.stderr and "the model wants (1000" in res.stderr and "--arch-kwargs" in res.stderr
    res = runner.invoke(app, ["inspect", str(weights), "--arch", "torchvision:resnet18", "--arch-kwargs", "[10]"])
    assert res.exit_code == 2 and "--arch-kwargs must be a JSON object" in res.stderr
    res = runner.invoke(app, ["inspect", str(weights), "--arch", "torchvision:resnet18", "--arch-kwargs",
                              '{"classes": 10}'])
    assert res.exit_code == 1 and "does not take the keyword arguments ['classes']" in res.stderr


def test_zoo_specs_take_no_arguments():
    with pytest.raises(rs.ModelLoadError, match="zoo models are built as shipped and take no keyword arguments"):
        rs.build_arch("zoo:mnist-mlp", kwargs={"hidden": 3})


def test_saving_a_model_without_an_architecture_warns_how_to_record_one(tmp_path):
    with pytest.warns(UserWarning, match=r"records no architecture.*arch='package.module:build_fn'"):
        rs.save(rs.convert(nn.Sequential(nn.Linear(3, 2)), lam=0.5), tmp_path / "m.safetensors")


def test_timm_pretrained_goes_offline_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants

    seen = []

    def create_model(name, pretrained=False, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        raise OSError("not in the local cache")

    monkeypatch.setattr(archspec, "_reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(timm, "create_model", create_model)
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(rs.ModelLoadError, match="could not fetch timm's pretrained weights for 'resnet18'.*Offline"):
        rs.load_model("timm:resnet18")
    assert seen == [True] and constants.HF_HUB_OFFLINE == before


def test_torchvision_pretrained_fails_at_once_when_neither_cached_nor_reachable(monkeypatch, tmp_path):
    pytest.importorskip("torchvision")
    monkeypatch.setattr(archspec, "_reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(rs.ModelLoadError, match="not in the local cache .* cannot be reached"):
        rs.load_model("torchvision:resnet18")
