"""BatchNorm recalibration after conversion (robust_surgery/surgery/recalibrate.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import robust_surgery as rs


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3)).eval()


def test_statistics_are_the_average_of_the_batches_and_nothing_else_changes():
    net = rs.convert(_bn_net(), lam=0.5, K=1)
    x = torch.rand(64, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    bn = net[1]
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    record = rs.recalibrate_batchnorm(net, (x, torch.zeros(64, dtype=torch.long)), 4, batch_size=16, seed=3)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = [net[0](x[order[i:i + 16]]) for i in range(0, 64, 16)]  # the BatchNorm's inputs, batch by batch
    want_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.transpose(0, 1).flatten(1).var(1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, want_var, rtol=1e-5, atol=1e-6)
    after = {k: v for k, v in net.state_dict().items() if k in before}
    assert all(torch.equal(before[k], after[k]) for k in before)  # no parameter moved
    assert bn.momentum == 0.1 and not net.training and not bn.training
    assert record == {"batches": 4, "batch_size": 16, "points": 64, "seed": 3, "batchnorm_layers": 1,
                      "data": "custom", "seconds": record["seconds"]}


def test_recalibration_is_recorded_and_travels_with_the_file(tmp_path):
    x = torch.rand(300, 1, 6, 6)
    net = rs.convert(_bn_net(), lam=0.5, K=1, recalibrate=2, recalibrate_data=x)  # 2 batches of 128
    manifest = rs.save(net, tmp_path / "m.safetensors", arch="test_recalibrate:_bn_net")
    assert manifest["recalibration"]["batches"] == 2 and manifest["recalibration"]["points"] == 256
    back = rs.load(tmp_path / "m.safetensors", trust_code=True)
    assert torch.equal(back[1].running_mean, net[1].running_mean)
    assert rs.read_manifest(tmp_path / "m.safetensors")["recalibration"] == manifest["recalibration"]


def test_bad_requests_are_clear():
    with pytest.raises(ValueError, match="needs the clean training data"):
        rs.convert(_bn_net(), recalibrate=3)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        rs.recalibrate_batchnorm(nn.Sequential(nn.Linear(3, 2)), torch.rand(8, 3), 1)
    with pytest.raises(ValueError, match="whole number of batches >= 1"):
        rs.recalibrate_batchnorm(_bn_net(), torch.rand(8, 1, 6, 6), 0)


def test_recalibration_recovers_clean_accuracy_of_a_converted_resnet(shared_data):
    """cifar-resnet20 with every conv at λ = 0.5 collapses (the BatchNorms no longer fit); 10 clean
    training batches of recalibration bring most of the clean accuracy back (measured: 13 → 78 %
    on 2000 test images with 50 batches, docs/results.md)."""
    base = rs.load_model("zoo:cifar-resnet20")
    p1 = rs.convert(base, 1, norm="L1", K=1, eps=5e-4, lam=0.5)

    def clean(model):
        rep = rs.evaluate(model, "cifar10", attacks=["fgsm"], eps=[0.0], n=200, checks=False, batch_size=200)
        return 100.0 * rep.clean[rep.variants[0]] / rep.n

    before = clean(p1)
    rs.recalibrate_batchnorm(p1, "cifar10", 10, batch_size=64)
    after = clean(p1)
    assert before < 30.0 and after > 65.0, (before, after)


def test_cli_convert_recalibrates_and_records_it(tmp_path):
    from typer.testing import CliRunner

    from robust_surgery.cli.app import app

    out = tmp_path / "r20.safetensors"
    res = CliRunner().invoke(app, ["convert", "zoo:cifar-resnet20", "--K", "1", "--lam", "0.5", "--recalibrate-bn", "2",
                                   "--data", "cifar10", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert "recalibrated 19 BatchNorm layers on 256 cifar10 training points" in res.stderr
    assert rs.read_manifest(out)["recalibration"]["batches"] == 2
