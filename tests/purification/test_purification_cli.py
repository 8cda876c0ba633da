"""`surgery purification`, `surgery pretrain` and `surgery inherit` end to end (Typer's runner, in process)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.cli.app import app

runner = CliRunner()
SYN = "synthetic:d=8,k=2,n_train=300,n_test=100,seed=1"


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_purification_on_a_zoo_model_with_plots(tmp_path):
    hist, grid = tmp_path / "h.png", tmp_path / "f.png"
    res = run("purification", "zoo:mnist-lenet", "--data", "mnist", "--layer", "conv1", "--basis", "random",
              "--n", 100, "--plot", hist, "--filters", grid, "--json", "--per-unit")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["layer"] == "conv1" and data["units"] == 10 and data["fan_in"] == 25 and data["n_examples"] == 100
    assert list(data["purity"]) == ["random"] and len(data["per_unit"]["random"]["pr"]) == 10
    assert hist.stat().st_size > 1000 and grid.stat().st_size > 1000
    res = run("purification", "zoo:mnist-lenet", "--data", "mnist", "--layer", "conv1", "--basis", "true", "--n", 50)
    assert res.exit_code == 1 and "synthetic" in res.stderr and "Traceback" not in res.output
    res = run("purification", "zoo:mnist-lenet", "--data", "mnist", "--layer", "conv9", "--n", 50)
    assert res.exit_code == 1 and "conv1" in res.stderr


def test_pretrain_then_purification_and_inherit_on_synthetic_data(tmp_path):
    clean, adv = tmp_path / "clean.safetensors", tmp_path / "adv.safetensors"
    res = run("pretrain", "mlp", "--data", SYN, "--hidden", 16, "--epochs", 2, "-o", clean, "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["history"]) == 2
    res = run("pretrain", "mlp", "--data", SYN, "--hidden", 16, "--epochs", 2, "--adversarial", "pgd", "--threat", "L2",
              "--eps", "1/4", "--ramp", 0.5, "--pgd-steps", 2, "-o", adv)
    assert res.exit_code == 0 and "saved" in res.stdout, res.output
    model = rs.load(adv)  # rebuilds from the file alone
    assert rs.read_manifest(adv)["training"]["eps"] == 0.25 / 4  # feature units -> pixels
    x = torch.rand(3, 1, 1, 8)
    assert model(x).shape == (3, 2)

    res = run("purification", adv, "--data", SYN, "--layer", "fc1", "--basis", "true", "--compare", clean, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert list(data["purity"]) == ["true", "random"] and data["pair"]["units"] == 16
    assert 1 <= data["purity"]["true"]["pr"]["mean"] <= 8

    res = run("inherit", f"clean={clean}", f"adv={adv}", "random", "--data", SYN, "--layer", "relu", "--eps", "0.1",
              "--threat", "L2", "--n-train", 300, "--n", 50, "--epochs", 5, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [r["encoder"] for r in rows] == ["clean", "adv", "random"]
    assert all(0 <= r["clean_acc"] <= 100 for r in rows)

    res = run("pretrain", "mlp", "--data", "mnist", "-o", tmp_path / "x.safetensors")
    assert res.exit_code == 2 and "synthetic" in res.stderr
    res = run("inherit", "random", "--data", SYN, "--layer", "relu")
    assert res.exit_code == 2 and "first encoder" in res.stderr


@pytest.mark.parametrize("cmd", ["purification", "pretrain", "inherit"])
def test_help_has_an_example(cmd):
    res = run(cmd, "--help")
    assert res.exit_code == 0 and "Example:" in res.stdout
