"""Hardened zoo models: the recipes run from the pretrained bases, and the shipped files
reproduce their paradigm-table rows (clean accuracy here; the worst case under the slow marker)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.cli.app import app
from robust_surgery.data.datasets import load_dataset, load_mnist
from robust_surgery.evaluation.run import format_eps
from robust_surgery.model_zoo.hardened import HARDENED, SHIPPED
from robust_surgery.model_zoo.train import evaluate_accuracy, train_zoo_model, trainable
from robust_surgery.io.zoo import get_entry

runner = CliRunner()
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def mnist_test(shared_data):
    return load_mnist("test", root=shared_data)


def test_every_recipe_is_trainable_and_starts_from_a_zoo_model():
    assert set(HARDENED) <= set(trainable())
    for name, recipe in HARDENED.items():
        assert get_entry(recipe.base).dataset in ("mnist", "cifar10")
        assert name.endswith("-at") == recipe.classical and recipe.paradigm == (2 if name.endswith("-p2") else 3)


def test_classical_recipe_gives_the_plain_architecture_trained_adversarially(tmp_path, mnist_test, shared_data):
    out = tmp_path / "at.safetensors"
    res = runner.invoke(app, ["zoo", "train", "mnist-lenet-at", "--epochs", "1", "--n-train", "1300",
                              "-o", str(out), "--json", "--data-root", str(shared_data)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    model = rs.load(out)
    assert not rs.nrpm_layers(model) and type(model.fc1) is torch.nn.Linear
    base = rs.load_model("zoo:mnist-lenet")
    assert model.state_dict().keys() == base.state_dict().keys()
    assert not torch.equal(model.fc1.weight, base.fc1.weight)  # it trained
    correct, n = evaluate_accuracy(model, *mnist_test)
    assert (correct, n) == (metrics["test_correct"], 10000) and metrics["train_wall_s"] > 0
    assert metrics["eps"] == 0.3 and metrics["steps"] == 5 and metrics["epochs"] == 1


def test_paradigm3_recipe_keeps_nrpm_layers_and_moves_lambda(shared_data):
    model, metrics = train_zoo_model("mnist-lenet-p3", epochs=1, n_train=1300, progress=False, data_root=shared_data)
    layers = dict(rs.nrpm_layers(model))
    assert set(layers) == {"conv1", "conv2", "fc1", "fc2"}
    assert all(abs(m.lam_value - 0.6) > 1e-4 for m in layers.values())  # λ trained (paradigm 3)
    assert all(m.settings.K == 1 and m.settings.norm == "L1" for m in layers.values())
    assert metrics["lam"] == {n: round(m.lam_value, 4) for n, m in layers.items()}


def _row(name: str) -> dict:
    table = "paradigms-full-lenet" if name.startswith("mnist-lenet") else "paradigms-full-resnet20"
    row = "adversarial-training" if name.endswith("-at") else "paradigm-3"
    return json.loads((RESULTS / table / f"{row}.json").read_text())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_loads_verified_and_reproduces_its_clean_accuracy(name, shared_data, tmp_path):
    entry = get_entry(name)
    model = rs.load_model(f"zoo:{name}", data_root=shared_data)
    assert model.zoo_info["sha256"] == entry.sha256
    assert bool(rs.nrpm_layers(model)) == (not HARDENED[name].classical)
    x, y = load_dataset(entry.dataset, "test", shared_data).tensors
    n = 2000  # a subset: the whole test set's count is in the registry and the table row
    correct, _ = evaluate_accuracy(model, x[:n], y[:n])
    row = _row(name)
    assert entry.reference_acc == row["clean_acc_full_test"]
    assert 100.0 * correct / n >= entry.reference_acc - 2.0  # first 2000 vs all 10000 points
    if entry.dataset == "mnist":  # cheap: the whole test set, exactly
        assert 100.0 * evaluate_accuracy(model, x, y)[0] / len(y) == entry.reference_acc
    rs.save(model, tmp_path / "m.safetensors")  # a saved copy loads as the same model
    again = rs.load(tmp_path / "m.safetensors")
    assert torch.equal(again(x[:64]), model(x[:64])) and len(rs.nrpm_layers(again)) == len(rs.nrpm_layers(model))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_reproduces_its_worst_case_on_the_first_batch(name, shared_data):
    """The table's protocol on its first evaluation batch gives the same per-point worst case."""
    row = _row(name)
    settings = json.loads((RESULTS / ("paradigms-full-lenet" if name.startswith("mnist") else "paradigms-full-resnet20")
                           / "settings.json").read_text())
    model = rs.load_model(f"zoo:{name}", data_root=shared_data)
    attacks = [r["attack"] if r["source"] == "direct" else r["source"] for r in row["results"]
               if r["model"] == row["results"][0]["model"]]
    batch = settings["eval_batch"]
    rep = rs.evaluate(model, get_entry(name).dataset, attacks=list(dict.fromkeys(attacks)), eps=settings["eps"],
                      n=batch, batch_size=batch, steps=settings["pgd_steps"], restarts=settings["restarts"],
                      data_root=shared_data)
    v = rep.variants[0]
    assert {format_eps(e): round(w * batch / 100) for e, w in rep.worst(v).items()} \
        == row["worst_first_batch"]
