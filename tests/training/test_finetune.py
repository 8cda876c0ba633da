"""Paradigms 2 and 3: what trains, what stays bit-identical, robustness gained, resuming."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.io.model_file import build_manifest
from robust_surgery.cli.app import app
from robust_surgery.data.datasets import load_mnist


@pytest.fixture(scope="module")
def mnist_train(shared_data):
    x, y = load_mnist("train", shared_data)
    return x[:2400], y[:2400]


@pytest.fixture(scope="module")
def mnist_test(shared_data):
    x, y = load_mnist("test", shared_data)
    return x[:500], y[:500]


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 5, stride=3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_paradigm_2_changes_only_lambda(mnist_train):
    model = rs.convert(ConvBN(), K=1, lam=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, history = rs.finetune(model, mnist_train, 2, adversarial="fgsm", eps=0.1, epochs=1, lr=0.05,
                                 n_train=300, val_n=100, batch_size=50, keep="last")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"conv.lam_logit", "fc.lam_logit"}  # weights, biases and BatchNorm statistics untouched
    assert len(history) == 1 and history[0]["train_loss"] > 0 and "val_robust_acc" in history[0]
    manifest = build_manifest(model)
    assert manifest["paradigm"] == 2 and manifest["training"]["adversarial"] == "fgsm"


def test_paradigm_3_changes_weights(mnist_train):
    model = rs.convert(ConvBN(), K=1, lam=0.5)
    w = model.conv.weight.detach().clone()
    model, _ = rs.finetune(model, mnist_train, 3, adversarial=None, epochs=1, lr=1e-2, n_train=300, val_n=100,
                           batch_size=50, keep="last")
    assert not torch.equal(w, model.conv.weight)


def test_adversarial_finetuning_beats_paradigm_1_under_fgsm(mnist_train, mnist_test):
    """Paradigm 2 from a mostly linear start (λ = 0.9): FGSM training moves λ towards NRPM."""
    def start():
        return rs.convert(rs.load_model("zoo:mnist-mlp-rs"), K=1, eps=5e-5, lam=0.9)

    test = (mnist_test[0][:300], mnist_test[1][:300])
    p1 = rs.evaluate(start(), test, attacks=["fgsm"], eps=[0.2], checks=False).robust_acc("nrpm", "fgsm", 0.2)
    tuned, history = rs.finetune(start(), mnist_train, 2, adversarial="fgsm", eps=0.2, epochs=1, lr=0.1,
                                 optimizer="adam", n_train=1000, val_n=300, batch_size=64)
    p2 = rs.evaluate(tuned, test, attacks=["fgsm"], eps=[0.2], checks=False).robust_acc("nrpm", "fgsm", 0.2)
    assert all(lam < 0.9 for lam in history[-1]["lam"].values())
    assert p2 > p1 + 5.0, (p1, p2)


def test_resume_gives_the_uninterrupted_result(mnist_train, tmp_path):
    kw = dict(adversarial="fgsm", eps=0.1, epochs=2, lr=0.05, n_train=200, val_n=100, batch_size=50, seed=1)
    whole, h_whole = rs.finetune(rs.convert(ConvBN(), K=1), mnist_train, 2, **kw)
    part, h_part = rs.finetune(rs.convert(ConvBN(), K=1), mnist_train, 2, checkpoint_dir=tmp_path,
                               max_epochs_this_run=1, log=tmp_path / "log.json", **kw)
    assert len(h_part) == 1 and len(json.loads((tmp_path / "log.json").read_text())) == 1
    resumed, h_res = rs.finetune(rs.convert(ConvBN(), K=1), mnist_train, 2, checkpoint_dir=tmp_path, **kw)
    assert [h["train_loss"] for h in h_res] == [h["train_loss"] for h in h_whole]
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="belongs to another run"):
        rs.finetune(rs.convert(ConvBN(), K=1), mnist_train, 2, checkpoint_dir=tmp_path, **{**kw, "lr": 0.1})


def test_finetune_refuses_plain_models_and_bad_settings(mnist_train):
    with pytest.raises(ValueError, match="needs a converted model"):
        rs.finetune(ConvBN(), mnist_train, 2)
    with pytest.raises(ValueError, match="paradigm 2 .* or 3"):
        rs.finetune(rs.convert(ConvBN()), mnist_train, 1)
    with pytest.raises(ValueError, match="adversarial must be"):
        rs.finetune(rs.convert(ConvBN()), mnist_train, 2, adversarial="cw")


def test_cli_convert_paradigm_2_and_finetune(tmp_path):
    runner = CliRunner()
    out = tmp_path / "p2.safetensors"
    res = runner.invoke(app, ["convert", "zoo:mnist-mlp-rs", "--paradigm", "2", "--data", "mnist", "--adversarial",
                              "fgsm", "--eps", "0.2", "--epochs", "1", "--n-train", "256", "--val-n", "128",
                              "--K", "1", "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    manifest = rs.read_manifest(out)
    assert manifest["paradigm"] == 2 and manifest["training"]["eps"] == 0.2
    # --eps is the training budget in paradigms 2-3; the reweighting ε comes from the zoo preset
    assert manifest["layers"]["fc1"]["eps"] == 5e-5 and "preset" in res.stderr
    assert len(manifest["training"]["history"]) == 1
    res = runner.invoke(app, ["finetune", str(out), "--paradigm", "3", "--data", "mnist", "--adversarial", "none",
                              "--epochs", "1", "--n-train", "256", "--val-n", "128", "-o", str(tmp_path / "p3.safetensors"),
                              "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert rs.read_manifest(tmp_path / "p3.safetensors")["paradigm"] == 3
    res = runner.invoke(app, ["convert", "zoo:mnist-mlp-rs", "--paradigm", "2", "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "--data" in res.stderr


def test_a_harmful_run_keeps_the_starting_model(mnist_train):
    """The starting model is epoch 0 of best-epoch selection: a run that only makes it worse returns it unchanged."""
    start = rs.convert(rs.load_model("zoo:mnist-mlp-rs"), K=1, eps=5e-5, lam=0.6)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    tuned, history = rs.finetune(start, mnist_train, 3, adversarial=None, epochs=1, lr=50.0, n_train=256, val_n=200,
                                 batch_size=64)
    training = rs._meta.get_meta(tuned)["training"]
    assert history[0]["val_clean_acc"] < training["start"]["val_clean_acc"]  # the epoch did harm...
    assert training["best_epoch"] == 0  # ...so the start was kept, bit for bit
    assert all(torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    last, _ = rs.finetune(rs.convert(rs.load_model("zoo:mnist-mlp-rs"), K=1, eps=5e-5, lam=0.6), mnist_train, 3,
                          adversarial=None, epochs=1, lr=50.0, n_train=256, val_n=200, batch_size=64, keep="last")
    assert not torch.equal(last.fc1.weight, before["fc1.weight"])  # keep="last" returns the harmed epoch
